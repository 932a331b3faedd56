"""Bi-level routing attention on CUDA (Triton path): parity with the gather path, backward, memory."""
import pytest
import torch

from visattn.methods import _routing_core as core
from visattn.methods.routing import BiLevelRouting, bilevel_routing_attention, bilevel_routing_attention_gather
from visattn import TokenGeometry

pytestmark = pytest.mark.gpu


def _qkv(B, H, N, D, dtype, hk=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(B, hk if i and hk else H, N, D, device="cuda", dtype=dtype, generator=g)
                 for i in range(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,hw,D,S,topk", [
    (2, 4, (56, 56), 64, 7, 4),      # aligned, block 64
    (1, 4, (28, 28), 32, 7, 4),      # aligned, block 16
    (1, 2, (99, 99), 64, 33, 5),     # 3x3 regions, 9801 tokens -> packed
    (1, 2, (50, 45), 64, 4, 3),      # legacy padding, packed (13x12 regions)
])
def test_triton_matches_gather(dtype, B, H, hw, D, S, topk):
    q, k, v = _qkv(B, H, hw[0] * hw[1], D, dtype)
    out, routing = bilevel_routing_attention(q, k, v, spatial_shape=hw, num_regions=S, topk=topk,
                                             return_routing=True)
    ref = bilevel_routing_attention_gather(q.float(), k.float(), v.float(), spatial_shape=hw, num_regions=S,
                                           topk=topk, routing=routing)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_auto_picks_triton_for_aligned_layout():
    from visattn.kernels.dispatch import _pick_auto
    q, k, v = _qkv(1, 2, 56 * 56, 64, torch.bfloat16)
    grid = core.make_region_grid((56, 56), 7)
    order = core.token_order(grid, 0, 3136, "cuda")
    routing = core.compute_routing(q, k, grid, 4, scale=0.125)
    lay = core.build_layout(routing, order, 49, 64, mask_padding=False)
    assert lay.stats()["partial"] == 0
    assert _pick_auto(q, lay, False) == "triton"


def test_backward_matches_gather():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 32 * 32, 64, torch.float32))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)
    out, routing = bilevel_routing_attention(q, k, v, spatial_shape=(32, 32), num_regions=4, topk=5,
                                             return_routing=True)
    out.backward(go)
    bilevel_routing_attention_gather(q2, k2, v2, spatial_shape=(32, 32), num_regions=4, topk=5,
                                     routing=routing).backward(go)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-2, rtol=2e-2)


def test_method_with_cls_token_bf16():
    n = 1 + 64 * 64
    q, k, v = _qkv(2, 4, n, 64, torch.bfloat16)
    geo = TokenGeometry(batch=2, heads=4, seq_len=n, kv_len=n, grid=(64, 64), spatial_start=1)
    out = BiLevelRouting(num_regions=8, topk=64)(q, k, v, geo)  # topk = all -> dense
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_memory_much_lower_than_gather():
    q, k, v = _qkv(1, 16, 128 * 128, 64, torch.bfloat16)
    kw = dict(spatial_shape=(128, 128), num_regions=16, topk=16)

    def peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        ours = peak(lambda: bilevel_routing_attention(q, k, v, **kw))
        gather = peak(lambda: bilevel_routing_attention_gather(q, k, v, **kw))
    assert gather >= 4 * ours, (gather, ours)


def test_module_sparse_matches_gather_bf16():
    from visattn.nn import BiLevelRoutingAttention
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4, side_dwconv=5).cuda().to(torch.bfloat16)
    g = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4, side_dwconv=5, implementation="gather")
    g = g.cuda().to(torch.bfloat16)
    g.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 56, 56, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(m(x).float(), g(x).float(), atol=3e-2, rtol=3e-2)
