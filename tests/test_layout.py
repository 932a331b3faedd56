"""BlockLayout: constructors, classification, stats, transposed lists, dense expansion, errors (CPU, exact)."""
import math

import pytest
import torch

from visattn.kernels import BlockLayout, pack_bits, unpack_bits


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_from_mod(mod, B, H, nq, nk, perm_q=None, perm_k=None):
    """Independent oracle: evaluate the predicate on every (q, k) pair in original positions."""
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(nq).view(1, 1, nq, 1)
    k = torch.arange(nk).view(1, 1, 1, nk)
    return torch.as_tensor(mod(b, h, q, k)).expand(B, H, nq, nk)


def _band(b, h, q, k):
    return (q - k).abs() <= 9 + 3 * h


def test_pack_unpack_roundtrip():
    m = torch.rand(5, 7, 70) < 0.5
    w = pack_bits(m)
    assert w.dtype == torch.int32 and w.shape == (5, 7, 3)
    assert torch.equal(unpack_bits(w, 70), m)
    # bit 31 set -> negative int32 word, still round-trips
    top = torch.zeros(1, 32, dtype=torch.bool)
    top[0, 31] = True
    assert int(pack_bits(top)[0, 0]) == -(2 ** 31)
    assert torch.equal(unpack_bits(pack_bits(top), 32), top)


@pytest.mark.parametrize("nq,nk,bs", [(64, 64, 16), (50, 75, (16, 32)), (33, 100, 32)])
def test_from_mask_mod_matches_predicate(nq, nk, bs):
    lay = BlockLayout.from_mask_mod(_band, batch=None, heads=2, seq_lens=(nq, nk), block_size=bs)
    assert lay.full_counts.shape[:2] == (1, 2)
    assert torch.equal(lay.to_dense(), _dense_from_mod(_band, 1, 2, nq, nk))
    cls_ = lay.block_classes()
    bm, bn = (bs, bs) if isinstance(bs, int) else bs
    # FULL blocks are never ragged in keys
    if nk % bn:
        assert not bool((cls_[..., -1] == 2).any())
    # every FULL block is entirely kept, every PARTIAL block is partly kept
    dense = _dense_from_mod(_band, 1, 2, nq, nk)
    for h in range(2):
        for qb in range(lay.num_q_blocks):
            for kb in range(lay.num_k_blocks):
                tile = dense[0, h, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
                c = int(cls_[0, h, qb, kb])
                assert c == (2 if bool(tile.all()) and tile.shape[1] == bn else 1 if bool(tile.any()) else 0)


def test_from_mask_mod_with_permutation_uses_original_positions():
    nq = nk = 48
    perm = torch.randperm(nq)
    lay = BlockLayout.from_mask_mod(_band, batch=1, heads=1, seq_lens=nq, block_size=16, perm_q=perm, perm_k=perm)
    assert torch.equal(lay.to_dense(), _dense_from_mod(_band, 1, 1, nq, nk))
    kernel_order = lay.to_dense(original_order=False)
    assert torch.equal(kernel_order, _dense_from_mod(_band, 1, 1, nq, nk)[:, :, perm][:, :, :, perm])
    assert torch.equal(lay.inv_perm_q, torch.argsort(perm))
    assert lay.stats()["permuted"] is True


def test_from_block_mask_ragged_tail_is_partial_and_stats():
    bm = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool).view(1, 1, 3, 3)
    lay = BlockLayout.from_block_mask(bm, block_size=16, seq_lens=(40, 40))
    s = lay.stats()
    assert (s["full"], s["partial"], s["empty"], s["total"]) == (3, 2, 4, 9)
    assert math.isclose(lay.density(), 5 / 9)
    assert torch.equal(lay.block_classes()[0, 0], torch.tensor([[2, 0, 1], [2, 2, 1], [0, 0, 0]], dtype=torch.int8))
    dense = lay.to_dense()[0, 0]
    assert dense.shape == (40, 40)
    expect = bm[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :40]
    assert torch.equal(dense, expect)


def test_from_indices_and_partial_lists():
    full_idx = torch.tensor([[[[0, 2], [1, 0]]]], dtype=torch.int32)
    full_cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    part_idx = torch.tensor([[[[1], [2]]]], dtype=torch.int32)
    part_cnt = torch.tensor([[[1, 1]]], dtype=torch.int32)
    mod = lambda b, h, q, k: (q + k) % 2 == 0  # noqa: E731
    lay = BlockLayout.from_indices(full_idx, full_cnt, block_size=16, seq_lens=(32, 48), partial_indices=part_idx,
                                   partial_counts=part_cnt, mask_mod=mod)
    cls_ = lay.block_classes()[0, 0]
    assert torch.equal(cls_, torch.tensor([[2, 1, 2], [0, 2, 1]], dtype=torch.int8))
    dense = lay.to_dense()[0, 0]
    q = torch.arange(32).view(-1, 1)
    k = torch.arange(48).view(1, -1)
    blk = cls_.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(dense, (blk == 2) | ((blk == 1) & ((q + k) % 2 == 0)))


def test_transposed_lists_are_the_forward_lists_inverted():
    torch.manual_seed(1)
    bmask = torch.rand(2, 3, 5, 4) < 0.5
    lay = BlockLayout.from_block_mask(bmask, block_size=16, seq_lens=(80, 60))
    t = lay.transposed()
    assert lay.transposed() is t  # cached
    cls_ = lay.block_classes()
    for kind, val in (("full", 2), ("partial", 1)):
        cnt, idx = t[f"{kind}_counts"], t[f"{kind}_indices"]
        assert cnt.shape == (2, 3, lay.num_k_blocks)
        for b in range(2):
            for h in range(3):
                for kb in range(lay.num_k_blocks):
                    lst = idx[b, h, kb, :int(cnt[b, h, kb])].tolist()
                    assert lst == sorted(lst)
                    assert lst == (cls_[b, h, :, kb] == val).nonzero().flatten().tolist()
    # partial mask ids in the transposed lists point at the same table rows
    ids_t = t["partial_mask_ids"]
    for b in range(2):
        for h in range(3):
            for kb in range(lay.num_k_blocks):
                for s in range(int(t["partial_counts"][b, h, kb])):
                    qb = int(t["partial_indices"][b, h, kb, s])
                    row = lay.partial_indices[b, h, qb, :int(lay.partial_counts[b, h, qb])].tolist()
                    assert int(ids_t[b, h, kb, s]) == int(lay.partial_mask_ids[b, h, qb, row.index(kb)])


def test_to_moves_layout():
    lay = BlockLayout.from_mask_mod(_band, batch=None, heads=None, seq_lens=32, block_size=16)
    lay2 = lay.to("cpu")
    assert torch.equal(lay2.to_dense(), lay.to_dense())
    assert "density=" in repr(lay2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=(16, 16, 16)), "block_size"),
    (dict(seq_lens=(-1, 4)), "seq_lens"),
])
def test_constructor_argument_errors(kwargs, match):
    base = dict(batch=None, heads=None, seq_lens=32, block_size=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BlockLayout.from_mask_mod(_band, **base)


def test_block_mask_errors():
    with pytest.raises(ValueError, match="bool"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2), block_size=16, seq_lens=32)
    with pytest.raises(ValueError, match="blocks"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), block_size=16, seq_lens=32)
    with pytest.raises(ValueError, match="perm_q"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=16, seq_lens=32,
                                    perm_q=torch.arange(31))


def test_indices_errors():
    idx = torch.tensor([[[[5]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        BlockLayout.from_indices(idx, None, block_size=16, seq_lens=(16, 32))
    with pytest.raises(ValueError, match="mask_mod"):
        BlockLayout.from_indices(idx * 0, None, block_size=16, seq_lens=(16, 32), partial_indices=idx * 0 + 1)
    with pytest.raises(ValueError, match="4-D"):
        BlockLayout.from_indices(idx[0], None, block_size=16, seq_lens=(16, 32))


def test_check_compatible_errors():
    lay = BlockLayout.from_mask_mod(_band, batch=2, heads=3, seq_lens=(32, 48), block_size=16)
    lay.check_compatible(2, 3, 32, 48)
    with pytest.raises(ValueError, match="seq_lens"):
        lay.check_compatible(2, 3, 32, 32)
    with pytest.raises(ValueError, match="batch"):
        lay.check_compatible(4, 3, 32, 48)
    with pytest.raises(ValueError, match="heads"):
        lay.check_compatible(2, 6, 32, 48)


def test_dispatch_rejects_mixed_dtypes_and_devices_by_name():
    from visattn.kernels import BlockLayout, block_sparse_attention

    layout = BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=32, seq_lens=64)
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attention(q, q.double(), q, layout)
