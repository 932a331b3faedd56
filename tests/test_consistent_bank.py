"""Identity-bank mode: write/read against explicit references, CFG slots, offload, budget, safetensors."""
import pytest
import torch

from visattn.geometry import TokenGeometry
from visattn.kernels import masked_attention
from visattn.methods import BankMemoryError, Consistent, IdentityBank
from visattn.methods._consistent_sampling import sample_mask

UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
ALWAYS = dict(gate=(1.0, 1.0), first_step_plain=False)


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _geom(B, chunks=2, step=2, grid=(3, 4), prefix=0, layer=UP, seed=7):
    N = prefix + grid[0] * grid[1]
    return TokenGeometry(batch=B, heads=2, seq_len=N, kv_len=N, grid=grid, spatial_start=prefix,
                         cfg_chunks=chunks, step=step, layer=layer, seed=seed)


def _write(m, bank, L=2, step=2, prefix=0):
    """Identity images: a batched-CFG call with L images per half."""
    N = prefix + 12
    k, v = _t(2 * L, 2, N, 4, seed=1), _t(2 * L, 2, N, 4, seed=2)
    q = _t(2 * L, 2, N, 4, seed=3)
    with m.writing(bank):
        m(q, k, v, _geom(2 * L, step=step, prefix=prefix))
    return k, v


def test_read_equals_explicit_reference_and_unbatched_cfg():
    m = Consistent(sample_rate=0.5, **ALWAYS)
    bank = IdentityBank("Bob")
    k_id, v_id = _write(m, bank, L=2)
    sel = sample_mask(7, 2, (3, 4), 2, 0.5)
    assert len(bank) == 2  # one (step, layer) entry per CFG half
    q, k, v = _t(2, 2, 12, 4, seed=4), _t(2, 2, 12, 4, seed=5), _t(2, 2, 12, 4, seed=6)
    m.set_read(bank)
    out = m(q, k, v, _geom(2, seed=99))  # panel: batched CFG, batch 1 per half
    for c in range(2):  # c = 0 uncond, 1 cond; bank tokens come from the same CFG half of the identity images
        ks = [k[c]] + [k_id[c * 2 + j][:, sel[j]] for j in range(2)]
        vs = [v[c]] + [v_id[c * 2 + j][:, sel[j]] for j in range(2)]
        ref = masked_attention(q[c:c + 1], torch.cat(ks, 1)[None], torch.cat(vs, 1)[None])[0]
        torch.testing.assert_close(out[c], ref, atol=1e-10, rtol=1e-10)
    # unbatched CFG: two calls at the same step read slot 0 then slot 1
    m.reset()
    g1 = _geom(1, chunks=1, seed=99)
    sep = torch.cat([m(q[:1], k[:1], v[:1], g1), m(q[1:], k[1:], v[1:], g1)])
    torch.testing.assert_close(sep, out, atol=1e-12, rtol=0)
    m.set_batch()


def test_write_with_unbatched_cfg_fills_two_slots():
    m = Consistent(sample_rate=1.0, **ALWAYS)
    bank = IdentityBank()
    k, v = _t(1, 2, 12, 4, seed=1), _t(1, 2, 12, 4, seed=2)
    with m.writing(bank):
        m(k, k, v, _geom(1, chunks=1))
        m(k + 1, k + 1, v + 1, _geom(1, chunks=1))
    assert sorted(bank.keys()) == [(2, 0, UP), (2, 1, UP)]
    torch.testing.assert_close(bank.get(2, 1, UP)[0], (k + 1)[0])


def test_write_stores_sampled_grid_tokens_only_where_gate_fires():
    m = Consistent(sample_rate=0.5, gate=(0.5, 0.5), first_step_plain=True)
    bank = IdentityBank()
    prefix = 3  # joint attention: text tokens are never stored
    layers = [f"up_blocks.0.a.{i}.attn1" for i in range(40)]
    with m.writing(bank):
        for step in range(3):
            for name in layers:
                q = _t(2, 2, prefix + 12, 4, seed=step)
                m(q, q, q, _geom(2, step=step, prefix=prefix, layer=name))
    steps = {key[0] for key in bank.keys()}
    assert 0 not in steps  # step 0 is plain: nothing to store
    per_step = len(bank) / 2 / 2
    assert 10 < per_step < 30  # about half of the 40 layers fire
    sel = sample_mask(7, 1, (3, 4), 1, 0.5)
    key = next(k for k in bank.keys() if k[0] == 1)
    assert bank.get(*key)[0].shape == (2, int(sel.sum()), 4)


def test_read_missing_entry_and_mismatched_settings():
    m = Consistent(sample_rate=0.5, **ALWAYS)
    bank = IdentityBank("Ann")
    _write(m, bank, step=2)
    m.set_read(bank)
    q = _t(2, 2, 12, 4)
    with pytest.raises(KeyError, match="same scheduler, step count"):
        m(q, q, q, _geom(2, step=3))
    with pytest.raises(ValueError, match="gate_seed"):
        Consistent(gate_seed=1, **ALWAYS).set_read(bank)
    with pytest.raises(ValueError, match="step"):
        m(q, q, q, _geom(2).with_(step=None))


def test_offload_dtype_and_budget():
    m = Consistent(sample_rate=1.0, **ALWAYS)
    bank = IdentityBank("x", device="cpu", dtype=torch.float16)
    _write(m, bank, L=1)
    k, _ = bank.get(2, 0, UP)
    assert k.dtype == torch.float16 and k.device.type == "cpu"
    assert bank.nbytes == 2 * 2 * (2 * 12 * 4) * 2  # 2 slots x (k, v) x tokens x fp16
    small = IdentityBank("tiny", max_bytes=bank.nbytes - 1)
    with pytest.raises(BankMemoryError, match="over its max_bytes budget"):
        _write(m, small, L=1)
    with pytest.raises(ValueError, match="max_bytes"):
        IdentityBank(max_bytes=-1)


def test_save_load_round_trip(tmp_path):
    m = Consistent(sample_rate=0.5, **ALWAYS)
    bank = IdentityBank("Bob", meta={"description": "a man in a black suit"})
    _write(m, bank, L=2, prefix=2)
    path = tmp_path / "bob.safetensors"
    bank.save(path)
    back = IdentityBank.load(path)
    assert back.name == "Bob" and back.meta["description"] == "a man in a black suit"
    assert back.meta["sample_rate"] == 0.5 and back.meta["gate"] == [1.0, 1.0]
    assert sorted(back.keys()) == sorted(bank.keys()) and back.nbytes == bank.nbytes
    for key in bank.keys():
        for a, b in zip(bank.get(*key), back.get(*key)):
            assert torch.equal(a, b)
    q = _t(2, 2, 14, 4, seed=9)
    with m.reading(bank):
        a = m(q, q, q, _geom(2, prefix=2))
    with m.reading(back):
        b = m(q, q, q, _geom(2, prefix=2))
    assert torch.equal(a, b) and m.mode == "batch"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a visattn identity bank"):
        IdentityBank.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        IdentityBank.load(tmp_path / "missing.safetensors")


def test_two_characters_concatenate():
    m = Consistent(sample_rate=1.0, **ALWAYS)
    a, b = IdentityBank("A"), IdentityBank("B")
    ka, va = _write(m, a, L=1)
    kb, vb = _write(m, b, L=1)
    q = _t(2, 2, 12, 4, seed=8)
    with m.reading(a, b):
        out = m(q, q, q, _geom(2))
    ref = masked_attention(q[1:], torch.cat([q[1], ka[1], kb[1]], 1)[None], torch.cat([q[1], va[1], vb[1]], 1)[None])
    torch.testing.assert_close(out[1:], ref, atol=1e-10, rtol=1e-10)


def test_bank_memory_from_shapes():
    from visattn.methods._consistent_memory import (bank_memory_table, expected_gated_steps, released_bank_bytes,
                                                    visattn_bank_bytes)

    t = bank_memory_table(768, 768, 35, 1, 0.5)
    assert abs(t["released_gpu_gib"] - 2.0187) < 1e-3  # research notes: 2.0 GiB
    assert abs(expected_gated_steps(35) - (0.7 * 19 + 0.9 * 15)) < 1e-9
    assert abs(t["visattn_fp16_gib"] / t["released_gpu_gib"] - 2 * 26.8 / 35) < 1e-6
    assert t["visattn_fp8_gib"] * 2 == pytest.approx(t["visattn_fp16_gib"])
    assert abs(released_bank_bytes(1024, 1024, 50, 2) / 2**30 - 10.25) < 0.01
    # the formula counts what an IdentityBank holds: one level, rate 1, gate always on
    levels = ((8, 8, 1),)  # 96x96 px / 8 -> 12x12 tokens, 8 channels = 2 heads x 4
    m = Consistent(sample_rate=1.0, **ALWAYS)
    bank = IdentityBank(dtype=torch.float16)
    q = _t(2, 2, 144, 4)
    with m.writing(bank):
        for step in range(3):
            m(q, q, q, _geom(2, step=step, grid=(12, 12)))
    want = visattn_bank_bytes(96, 96, 3, 1, 1.0, levels=levels, gate=(1.0, 1.0), first_step_plain=False)
    assert bank.nbytes == want["total"]


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 dtype in this torch")
def test_fp8_bank_is_read_like_the_rounded_fp16_bank():
    """An fp8 bank is dequantised when read: the panel equals the explicit reference with fp8-rounded identity
    tokens, and it differs from plain attention (the bank is really used)."""
    m = Consistent(sample_rate=0.5, **ALWAYS)
    bank = IdentityBank("Bob", dtype=torch.float8_e4m3fn)
    k_id, v_id = _write(m, bank, L=2)
    assert bank.get(2, 0, UP)[0].dtype == torch.float8_e4m3fn
    rnd = lambda x: x.to(torch.float8_e4m3fn).to(torch.float64)  # noqa: E731
    sel = sample_mask(7, 2, (3, 4), 2, 0.5)
    q, k, v = _t(2, 2, 12, 4, seed=4), _t(2, 2, 12, 4, seed=5), _t(2, 2, 12, 4, seed=6)
    m.set_read(bank)
    out = m(q, k, v, _geom(2, seed=99))
    m.set_batch()
    for c in range(2):
        ks = [k[c]] + [rnd(k_id[c * 2 + j][:, sel[j]]) for j in range(2)]
        vs = [v[c]] + [rnd(v_id[c * 2 + j][:, sel[j]]) for j in range(2)]
        ref = masked_attention(q[c:c + 1], torch.cat(ks, 1)[None], torch.cat(vs, 1)[None])[0]
        torch.testing.assert_close(out[c], ref, atol=1e-10, rtol=1e-10)
        plain = masked_attention(q[c:c + 1], k[c:c + 1], v[c:c + 1])[0]
        assert (out[c] - plain).abs().max() > 1e-3
