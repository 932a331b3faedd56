"""AgentSD on the GPU: no host synchronisation per call, bf16 close to fp32. Marked ``gpu``: skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

from visattn import TokenGeometry
from visattn.methods import Agent

pytestmark = pytest.mark.gpu


def _inputs(side, dtype, c=320, heads=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    qkv = [torch.randn(2, n, c, generator=g).to("cuda", dtype).view(2, n, heads, c // heads).transpose(1, 2)
           for _ in range(3)]
    geo = TokenGeometry(2, heads, n, n, grid=(side, side), step=0, num_steps=50, layer="down_blocks.0.attn1",
                        base_grid=(side, side), cfg_chunks=2, seed=7)
    return qkv, geo


@pytest.mark.parametrize("kw", [{}, dict(steps=(0, 0)), dict(merge="pool", merge_ratio=0.0)])
def test_no_host_sync_per_call(kw):
    (q, k, v), geo = _inputs(64, torch.bfloat16)
    m = Agent(**kw)
    m(q, k, v, geo)                                   # first call may fill caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = m(q, k, v, geo.with_(step=1))               # a new step: a fresh random dst draw
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_bf16_close_to_fp32():
    (q, k, v), geo = _inputs(64, torch.float32)
    m = Agent()
    ref = m(q, k, v, geo)
    out = m(q.bfloat16(), k.bfloat16(), v.bfloat16(), geo)
    assert m.last_stats[geo.layer]["mode"] == "agent"
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), 0) > 0.99


@pytest.mark.parametrize("kw", [{}, dict(steps=(0, 0))])
def test_cuda_graph_replay_matches_eager(kw):
    """The captured device work gives the eager result (same kernels; fp32 atomics in the merge may reorder sums)."""
    eager, graphed = Agent(cuda_graph=False, **kw), Agent(cuda_graph=True, **kw)
    for step in range(3):                                       # capture on the first call, replays after it
        (q, k, v), geo = _inputs(64, torch.bfloat16, seed=step)
        geo = geo.with_(step=step)
        with torch.inference_mode():
            ref, out = eager(q, k, v, geo), graphed(q, k, v, geo)
        assert graphed.last_stats[geo.layer].get("cuda_graph") is True
        assert "cuda_graph" not in eager.last_stats[geo.layer]
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, rel
    assert graphed._graphs.captures == 1 and graphed._graphs.replays == 3 and not graphed._graphs.failed


def test_cuda_graph_not_used_with_autograd_or_large_grids():
    (q, k, v), geo = _inputs(64, torch.bfloat16)
    m = Agent()
    qq = q.detach().clone().requires_grad_()
    m(qq, k, v, geo).float().sum().backward()
    assert "cuda_graph" not in m.last_stats[geo.layer] and qq.grad is not None
    (q, k, v), geo = _inputs(192, torch.bfloat16)                # 36,864 tokens > the "auto" limit
    with torch.inference_mode():
        m(q, k, v, geo)
    assert "cuda_graph" not in m.last_stats[geo.layer]


def test_cuda_graph_captured_in_inference_mode_replays_under_no_grad():
    """Buffers captured under inference_mode are plain tensors, so a later no_grad call can replay into them."""
    m = Agent(cuda_graph=True)
    (q, k, v), geo = _inputs(64, torch.bfloat16)
    with torch.inference_mode():
        first = m(q, k, v, geo)
    with torch.no_grad():
        second = m(q, k, v, geo)
    assert m.last_stats[geo.layer].get("cuda_graph") is True and m._graphs.replays == 2
    assert torch.equal(first, second)
