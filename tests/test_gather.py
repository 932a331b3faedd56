"""Token gathers for layout permutations (kernels/gather.py): the Triton copy (interpreter on CPU, or the GPU)
equals ``index_select`` exactly, in both output memory layouts, and its gradient is the inverse gather."""
import pytest
import torch

from visattn.kernels import triton_backend as tb
from visattn.kernels.gather import _empty_out, _triton_gather, gather_tokens, permute_tokens

DEV = "cuda" if torch.cuda.is_available() and not tb.INTERPRET else "cpu"
needs_kernel = pytest.mark.skipif(not tb.INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")


@needs_kernel
@pytest.mark.parametrize("heads_last_in", [False, True])
@pytest.mark.parametrize("heads_last_out", [False, True])
@pytest.mark.parametrize("D", [32, 40, 200])  # 200: two 128-wide chunks, the second masked
def test_triton_gather_equals_index_select(heads_last_in, heads_last_out, D):
    B, H, N = 2, 3, 70
    x = torch.randn(B, N, H, D, device=DEV).transpose(1, 2) if heads_last_in else torch.randn(B, H, N, D, device=DEV)
    idx = torch.randperm(N, device=DEV)[:50]
    out = _triton_gather(x, idx, _empty_out(x, idx.numel(), heads_last_out))
    assert torch.equal(out, x.index_select(2, idx))
    assert out.transpose(1, 2).is_contiguous() == heads_last_out


def test_gather_tokens_keeps_the_requested_memory_layout():
    x = torch.randn(1, 2, 9, 4, device=DEV)
    idx = torch.tensor([3, 1, 8], device=DEV)
    for heads_last in (False, True):
        y = gather_tokens(x, idx, heads_last=heads_last)
        assert torch.equal(y, x[:, :, idx]) and y.transpose(1, 2).is_contiguous() == heads_last
    with pytest.raises(ValueError, match="x must be"):
        gather_tokens(x[0], idx)
    with pytest.raises(ValueError, match="idx must be 1-D"):
        gather_tokens(x, idx[None])


def test_permute_tokens_gradient_is_the_inverse_gather():
    x = torch.randn(1, 2, 16, 8, device=DEV, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(16, device=DEV)
    inv = torch.argsort(perm)
    w = torch.randn(1, 2, 16, 8, device=DEV, dtype=torch.float64)
    for heads_last in (False, True):
        x.grad = None
        (permute_tokens(x, perm, inv, heads_last=heads_last) * w).sum().backward()
        assert torch.equal(x.grad, w[:, :, inv])
