"""Factored PARTIAL-block masks (``BlockLayout.mask_factors``): the factorisation is exact or refused, and the
Triton forward that masks with a one-hot product matches the bit-mask path and the dense reference
(interpreter on CPU). Tolerances as in test_kernel_triton.py: fp32 2e-5 max abs error."""
import pytest
import torch

from visattn.functional import neighborhood_attention
from visattn.kernels import BlockLayout, block_sparse_attention, masked_attention
from visattn.kernels import triton_backend as tb
from visattn.kernels.layout import MASK_BIG, factor_masks, pack_bits, unpack_bits
from visattn.methods import _na_layout as nl
from visattn.methods.neighborhood import make_spec

needs_kernel = pytest.mark.skipif(not tb.INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")
DEV = "cuda" if torch.cuda.is_available() and not tb.INTERPRET else "cpu"


def test_factors_reproduce_a_per_axis_mask_exactly():
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.rand(3, 8, 4, generator=g) < 0.6, torch.rand(3, 8, 4, generator=g) < 0.6
    keep = (rows[..., :, None] & cols[..., None, :]).reshape(3, 8, 16)  # row r keeps x0 in rows[r], x1 in cols[r]
    bias, onehot = factor_masks(pack_bits(keep), 16, (4, 4))
    assert bias.dtype == onehot.dtype == torch.bfloat16 and bias.shape == (3, 8, 16) and onehot.shape == (16, 16)
    val = bias.double() @ onehot.double()
    assert torch.equal(val == 0, keep)
    assert bool((val[~keep] <= -MASK_BIG).all())


def test_non_factorable_masks_wide_maps_and_wrong_dims_are_refused():
    keep = torch.zeros(1, 4, 16, dtype=torch.bool)
    keep[0, 0, [0, 5]] = True  # (0,0) and (1,1) without (0,1), (1,0): not a product of per-axis sets
    assert factor_masks(pack_bits(keep), 16, (4, 4)) is None
    assert factor_masks(pack_bits(torch.ones(1, 4, 64, dtype=torch.bool)), 64, (64,)) is None  # one-hot too wide
    assert factor_masks(pack_bits(torch.ones(1, 4, 16, dtype=torch.bool)), 16, (4, 8)) is None  # 32 != 16


def test_axes_of_extent_one_are_dropped():
    keep = torch.zeros(2, 4, 16, dtype=torch.bool)
    keep[0, :, 3:9] = True
    bias, onehot = factor_masks(pack_bits(keep), 16, (1, 16))
    assert bias.shape[-1] == 16 and torch.equal((bias.double() @ onehot.double()) == 0, keep)


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal", [
    ((16, 16), (5, 7), (1, 1), (1, 1), False),
    ((16, 16), (5, 5), (2, 1), (1, 1), True),
    ((16, 16), (8, 8), (1, 1), (4, 4), False),
    ((8, 8, 8), (3, 5, 5), (1, 1, 1), (1, 1, 1), (True, False, False)),
])
def test_na_layouts_carry_factors_that_equal_their_bit_masks(shape, kernel, dilation, stride, causal):
    lay = nl.get_layout(make_spec(shape, kernel, dilation=dilation, stride=stride, is_causal=causal), (32, 16), "cpu")
    assert lay.stats()["partial"] > 0 and lay.mask_factors is not None
    bias, onehot = lay.mask_factors
    assert torch.equal((bias.double() @ onehot.double()) == 0, unpack_bits(lay.mask_table, 16))


@needs_kernel
@pytest.mark.parametrize("shape,kernel,dilation,causal", [((16, 16), (5, 7), (2, 1), False),
                                                          ((8, 8, 8), (3, 5, 5), (1, 1, 1), True)])
def test_forward_with_factors_matches_bits_and_reference(shape, kernel, dilation, causal):
    N = 1
    for s in shape:
        N *= s
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 32, device=DEV, generator=g) for _ in range(3))
    kw = dict(spatial_shape=shape, kernel_size=kernel, dilation=dilation, is_causal=causal)
    ref = neighborhood_attention(q.double(), k.double(), v.double(), backend="sdpa", **kw)
    assert nl.get_layout(make_spec(shape, kernel, dilation=dilation, is_causal=causal), (32, 16), DEV).mask_factors \
        is not None
    with_factors = neighborhood_attention(q, k, v, backend="triton", block_size=(32, 16), **kw)
    saved = dict(tb.CONFIG_OVERRIDES)
    tb.CONFIG_OVERRIDES[("fwd", None, None, None, None)] = {"factors": False}
    try:
        with_bits = neighborhood_attention(q, k, v, backend="triton", block_size=(32, 16), **kw)
    finally:
        tb.CONFIG_OVERRIDES.clear()
        tb.CONFIG_OVERRIDES.update(saved)
    assert (with_factors.double() - ref).abs().max().item() < 2e-5
    assert (with_factors - with_bits).abs().max().item() < 2e-5


@needs_kernel
def test_rows_masked_out_by_factors_give_zero_and_minus_inf():
    def mod(b, h, q, k):  # rows 40..47 keep nothing inside their PARTIAL block; rows 32..39 keep keys 16..19
        return ((q < 16) | ((q >= 32) & (q < 40))) & (k < 20)
    nq, nk = 48, 40
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=(nq, nk), block_size=16, device=DEV)
    lay.mask_factors = factor_masks(lay.mask_table, 16, (4, 4))
    assert lay.mask_factors is not None
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 32, device=DEV, generator=g) for n in (nq, nk, nk))
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    assert torch.equal(out[:, :, 40:], torch.zeros_like(out[:, :, 40:]))
    assert bool(torch.isneginf(lse[:, :, 40:]).all()) and bool(torch.isneginf(lse[:, :, 16:32]).all())
    dense = lay.to_dense()
    ref = masked_attention(q.double(), k.double(), v.double(), dense)
    assert (out.double() - ref).abs().max().item() < 2e-5


def test_fwd_partial_config_uses_two_stages_and_follows_fwd_overrides():
    assert tb.kernel_config("fwd_partial", 128, 64, 128, torch.bfloat16)["num_stages"] == 2
    assert tb.kernel_config("fwd", 128, 64, 128, torch.bfloat16)["num_stages"] == 3
    saved = dict(tb.CONFIG_OVERRIDES)
    tb.CONFIG_OVERRIDES[("fwd", None, None, None, None)] = {"num_stages": 4}
    try:
        assert tb.kernel_config("fwd_partial", 128, 64, 128, torch.bfloat16)["num_stages"] == 4
    finally:
        tb.CONFIG_OVERRIDES.clear()
        tb.CONFIG_OVERRIDES.update(saved)


@needs_kernel
def test_prefilled_layout_info_without_partial_fraction_still_runs():
    """Routing layouts pre-fill the launch facts without ``partial_frac``: the forward must not need it."""
    lay = BlockLayout.from_mask_mod(lambda b, h, q, k: q >= k, batch=None, heads=None, seq_lens=64, block_size=16,
                                    device=DEV)
    lay._cache["triton_info"] = {"HAS_FULL": True, "HAS_PARTIAL": True, "mean_row": 2.5}
    g = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = (torch.randn(1, 2, 64, 32, device=DEV, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, lay, backend="triton")
    ref = masked_attention(q.double(), k.double(), v.double(), lay.to_dense())
    assert (out.double() - ref).abs().max().item() < 2e-5


@needs_kernel
def test_zero_scale_keeps_the_mask():
    """scale=0 (uniform weights over kept keys) must not let the biased, dropped keys in: bits are used then."""
    shape, kernel = (16, 16), (5, 5)
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 32, device=DEV, generator=g) for _ in range(3))
    lay = nl.get_layout(make_spec(shape, kernel), (32, 16), DEV)
    assert lay.mask_factors is not None
    out = block_sparse_attention(q, k, v, lay, backend="triton", scale=0.0)
    ref = masked_attention(q.double(), k.double(), v.double(), lay.to_dense(), scale=0.0)
    assert (out.double() - ref).abs().max().item() < 2e-5
