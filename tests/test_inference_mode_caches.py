"""Layouts and index tables are cached across calls: a first call under torch.inference_mode() must not leave
inference tensors behind that a later autograd call would fail to save for backward."""
from __future__ import annotations

import pytest
import torch

from visattn.functional import bilevel_routing_attention, neighborhood_attention


@pytest.mark.parametrize("name,fn", [
    ("neighborhood", lambda q, k, v: neighborhood_attention(q, k, v, spatial_shape=(30, 30), kernel_size=5)),
    ("routing", lambda q, k, v: bilevel_routing_attention(q, k, v, spatial_shape=(30, 30), num_regions=4, topk=3,
                                                         backend="sdpa")),
    ("routing-padded", lambda q, k, v: bilevel_routing_attention(q, k, v, spatial_shape=(29, 31), num_regions=4,
                                                                topk=2, backend="sdpa")),
])
def test_inference_mode_first_then_autograd(name, fn):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 900 if name != "routing-padded" else 899, 16) for _ in range(3))
    with torch.inference_mode():
        first = fn(q, k, v)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), first, atol=1e-6, rtol=0)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qg, kg, vg))


def test_flex_block_mask_cached_under_inference_mode_holds_plain_tensors():
    """The FlexAttention BlockMask (and its block-id map) cached on a layout are built outside inference mode, so
    flex's autograd can save them in a later training call."""
    from visattn.kernels.flex_backend import _block_id_map, to_flex_block_mask
    from visattn.kernels.layout import BlockLayout

    lay = BlockLayout.from_mask_mod(lambda b, h, q, k: (q - k).abs() <= 20, batch=None, heads=None, seq_lens=64,
                                    block_size=16)
    with torch.inference_mode():
        bm = to_flex_block_mask(lay)
        ids = _block_id_map(lay)
    tensors = [t for t in bm.as_tuple() if isinstance(t, torch.Tensor)] + [ids]
    assert tensors and not any(t.is_inference() for t in tensors)
