"""visattn.nn.BiLevelRoutingAttention: BiFormer checkpoint names, parity with the released legacy forward."""
import pytest
import torch

import visattn
from visattn.nn import BiLevelRoutingAttention

from _routing_ref import legacy_module_forward


def released_state_dict(dim, qk_dim, side_dwconv=3, dtype=torch.float64):
    """A state dict with the released legacy module's parameter names and shapes (random values)."""
    return {
        "lepe.weight": torch.randn(dim, 1, side_dwconv, side_dwconv, dtype=dtype) * 0.2,
        "lepe.bias": torch.randn(dim, dtype=dtype) * 0.1,
        "qkv.qkv.weight": torch.randn(2 * qk_dim + dim, dim, dtype=dtype) * dim ** -0.5,
        "qkv.qkv.bias": torch.randn(2 * qk_dim + dim, dtype=dtype) * 0.1,
        "wo.weight": torch.randn(dim, dim, dtype=dtype) * dim ** -0.5,
        "wo.bias": torch.randn(dim, dtype=dtype) * 0.1,
    }


def test_exported():
    assert visattn.nn.BiLevelRoutingAttention is BiLevelRoutingAttention


def test_loads_released_names_strictly():
    m = BiLevelRoutingAttention(32, num_heads=4, n_win=7, topk=4, side_dwconv=5)
    sd = released_state_dict(32, 32, side_dwconv=5, dtype=torch.float32)
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert set(m.state_dict()) == set(sd)
    torch.testing.assert_close(m.qkv.qkv.weight, sd["qkv.qkv.weight"], atol=0, rtol=0)
    # a BiFormer checkpoint stores them under "stages.i.j.attn.": strip the prefix and load
    ckpt = {f"stages.0.1.attn.{k}": t for k, t in sd.items()}
    m.load_state_dict({k.split("attn.", 1)[1]: t for k, t in ckpt.items()}, strict=True)


@pytest.mark.parametrize("hw,n_win,topk,qk_dim,auto_pad,heads", [
    ((14, 14), 7, 4, 32, False, 4),   # stage-2-like: 2x2 regions -> dense fallback
    ((16, 16), 4, 3, 32, False, 2),   # 4x4 regions -> aligned block 16
    ((15, 13), 4, 5, 32, True, 4),    # auto_pad: padded tokens carry the qkv bias, unmasked
    ((8, 8), 2, 2, 16, False, 2),     # qk_dim != dim
])
def test_matches_released_forward_fp64(hw, n_win, topk, qk_dim, auto_pad, heads):
    dim = 32
    m = BiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, qk_dim=qk_dim, topk=topk, auto_pad=auto_pad,
                                side_dwconv=3).double()
    sd = released_state_dict(dim, qk_dim)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, *hw, dim, dtype=torch.float64)
    ref = legacy_module_forward(x, sd, n_win=n_win, num_heads=heads, qk_dim=qk_dim, topk=topk, auto_pad=auto_pad)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_gather_implementation_matches_and_backward():
    m = BiLevelRoutingAttention(32, num_heads=4, n_win=4, topk=3)
    g = BiLevelRoutingAttention(32, num_heads=4, n_win=4, topk=3, implementation="gather")
    g.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 16, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = m(x), g(x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.qkv.qkv.weight.grad, g.qkv.qkv.weight.grad, atol=1e-4, rtol=1e-4)


def test_module_errors():
    with pytest.raises(ValueError, match="multiples of n_win"):
        BiLevelRoutingAttention(16, num_heads=2, n_win=4, topk=2)(torch.randn(1, 10, 12, 16))
    with pytest.raises(NotImplementedError):
        BiLevelRoutingAttention(16, num_heads=2, kv_downsample_mode="avgpool")
    with pytest.raises(NotImplementedError):
        BiLevelRoutingAttention(16, num_heads=2, soft_routing=True)
    with pytest.raises(ValueError, match="divisible"):
        BiLevelRoutingAttention(18, num_heads=4)
