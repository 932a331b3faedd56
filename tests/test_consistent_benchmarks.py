"""The consistent-attention benchmark scripts on their CPU configurations.

bench_consistent_memory.py (tiny UNet): the released-app re-implementation computes the same panels as visattn's
bank (only the storage differs), and both banks hold exactly the bytes predicted from shapes.
bench_consistent_attention.py: the concat and layout paths agree and every figure is recorded."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_consistent_attention as bca  # noqa: E402
import bench_consistent_memory as bcm  # noqa: E402

import visattn  # noqa: E402
from visattn.methods import Consistent, IdentityBank  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(steps=4, size=128):
    pytest.importorskip("diffusers")
    cfg = bcm.TINY_UNET
    unet = bcm.build_unet(cfg, torch.device("cpu"), torch.float32)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    mk = lambda n, seed: bcm.Runner(unet, (size, size), steps, n, cfg["cross_attention_dim"], pooled,  # noqa: E731
                                    torch.device("cpu"), torch.float32, seed=seed)
    layers = bcm.shared_layers(unet, (size // 8, size // 8), len(cfg["block_out_channels"]))
    return unet, mk(1, 0), mk(1, 1), layers


def test_meta_build_is_finite_and_deterministic():
    unet, ident, _, layers = _setup(steps=2)
    assert not any(p.is_meta for p in unet.parameters())
    out = ident()
    assert torch.isfinite(out).all()
    unet2, ident2, _, _ = _setup(steps=2)
    assert torch.equal(ident2(), out)
    assert len(layers) == 6 and {g for g, _, _ in layers.values()} == {(4, 4), (8, 8)}


def test_released_reimplementation_reads_like_visattn_bank():
    """Same samples (seed 0) and gates forced on: re-projecting stored hidden states (released) and storing the
    projected K/V (visattn) give the same panel; the banks hold exactly the predicted bytes."""
    steps = 4
    unet, ident, panel, layers = _setup(steps)
    m = Consistent(sample_rate=0.5, seed=bcm.SAMPLE_SEED, gate=(1.0, 1.0))
    exact = bcm.exact_bank_bytes(layers, steps, 1, 0.5, 4, m)
    assert exact["gated_pairs"] == (steps - 1) * len(layers)  # step 0 is plain

    rs = bcm.ReleasedState(1, 0.5, gate=(1.0, 1.0))
    procs, undo = bcm.install_released(unet, layers, rs)
    try:
        rs.write, rs.step = True, -1
        ident()
        rs.write, rs.step = False, -1
        released_panel = panel()
        assert sum(p.nbytes() for p in procs.values()) == exact["released_bytes"]
    finally:
        undo()

    bank = IdentityBank("t")
    with visattn.apply(unet, m, layers=m.layer_filter(), cfg_chunks=2):
        with m.writing(bank):
            ident()
        with m.reading(bank):
            ours_panel = panel()
    assert bank.nbytes == exact["visattn_elements"] * 4
    plain_panel = panel()
    assert (released_panel - plain_panel).abs().max() > 1e-4  # the bank changes the panel ...
    torch.testing.assert_close(ours_panel, released_panel, atol=1e-4, rtol=1e-4)  # ... in the same way


def test_memory_script_tiny_mode(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "mem.json"
    res = bcm.main(["--tiny", "--steps", "3", "--skip", "visattn_gpu_fp8", "--out", str(out)])
    assert out.is_file()
    ph = res["phases"]
    assert {"plain_write", "released_read", "visattn_gpu_read", "visattn_cpu_read", "visattn_cpu_fp8_read"} <= set(ph)
    assert all(v["bank_matches_exact"] for k, v in ph.items() if k.endswith("_write") and k != "plain_write")
    assert all(v["output_finite"] for v in ph.values())
    assert set(res["summary"]) == {"plain", "released", "visattn_gpu", "visattn_cpu", "visattn_cpu_fp8"}


def test_attention_script_cpu(tmp_path):
    res = bca.main(["--repeats", "1", "--out", str(tmp_path / "attn.json")])
    assert (tmp_path / "attn.json").is_file() and len(res["rows"]) == 2
    for row in res["rows"]:
        assert row["layout_sdpa_max_abs_diff_vs_concat"] < 1e-4
        for key in ("plain_ms", "concat_ms", "concat_new_step_ms", "concat_per_step_ms", "layout_build_ms",
                    "layout_sdpa_ms", "layout_sdpa_new_step_ms", "layout_sdpa_per_step_ms"):
            assert row[key] > 0, key
        assert 0 < row["layout_density"] <= 1
