"""Neighborhood attention on the GPU (Triton backend) at real sizes: sampled-row fp32 references, backward,
nn modules and layout building on the device. Marked ``gpu``: skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from visattn.functional import neighborhood_attention
from visattn.kernels import masked_attention
from visattn.methods import _na_layout as nl
from visattn.methods._na_mask import make_mask_mod
from visattn.methods.neighborhood import make_spec
from visattn.nn import NeighborhoodAttention2D

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rows_reference(q, k, v, spec, rows, scale=None):
    """fp32 attention of the query ``rows`` against all keys under the NA mask (no N x N tensor)."""
    mm = make_mask_mod(spec, q.device)
    mask = mm(0, 0, rows[:, None], torch.arange(spec.seq_len, device=q.device)[None, :])
    return masked_attention(q[:, :, rows].float(), k.float(), v.float(), mask, scale=scale)


@pytest.mark.parametrize("shape,kernel,dil,stride,causal,glob,D", [
    ((128, 128), (40, 40), 1, 1, False, (0, 0), 128),
    ((128, 128), (40, 40), 1, (8, 8), False, (0, 0), 128),
    ((96, 80), (13, 17), (2, 3), (1, 4), (False, True), (512, 0), 64),
    ((8, 32, 48), (4, 12, 12), 1, 1, (True, False, False), (0, 77), 128),
    ((8, 32, 48), (4, 12, 12), 1, (4, 4, 4), False, (0, 0), 64),
    ((16384,), (1024,), 1, 1, False, (1, 0), 128),
    ((16384,), (1024,), 2, 1, True, (0, 0), 64),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_rows(shape, kernel, dil, stride, causal, glob, D, dtype):
    spec = make_spec(shape, kernel, dil, stride, causal, glob)
    N = spec.seq_len
    q, k, v = (torch.randn(1, 4, N, D, device=DEV, dtype=dtype) for _ in range(3))
    out = neighborhood_attention(q, k, v, spatial_shape=shape, kernel_size=kernel, dilation=dil, stride=stride,
                                 is_causal=causal, num_global_tokens=glob, backend="triton")
    rows = torch.cat([torch.arange(glob[0] + 2, device=DEV), torch.randint(0, N, (254,), device=DEV),
                      torch.arange(N - 2, N, device=DEV)])
    ref = rows_reference(q, k, v, spec, rows)
    torch.testing.assert_close(out[:, :, rows].float(), ref, atol=2e-2, rtol=0)


def test_triton_gqa_and_fp32():
    shape, kernel = (64, 64), (21, 16)
    spec = make_spec(shape, kernel)
    q = torch.randn(2, 8, 4096, 64, device=DEV)
    k, v = torch.randn(2, 2, 2, 4096, 64, device=DEV).unbind(0)
    out = neighborhood_attention(q, k, v, spatial_shape=shape, kernel_size=kernel, backend="triton")
    rows = torch.randint(0, 4096, (256,), device=DEV)
    ref = rows_reference(q, k, v, spec, rows)
    torch.testing.assert_close(out[:, :, rows], ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape,kernel,stride,causal", [
    ((48, 64), (17, 24), (1, 1), False),
    ((48, 64), (16, 16), (8, 8), False),
    ((4, 24, 32), (3, 9, 8), (1, 1, 1), (True, False, False)),
])
def test_triton_backward_matches_reference(shape, kernel, stride, causal):
    spec = make_spec(shape, kernel, stride=stride, is_causal=causal, num_global_tokens=(2, 0))
    N = spec.seq_len
    q, k, v = (torch.randn(1, 2, N, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, spatial_shape=shape, kernel_size=kernel, stride=stride, is_causal=causal,
                                 num_global_tokens=(2, 0), backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = nl.get_layout(spec, (128, 128), DEV).to_dense()
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = masked_attention(qf, kf, vf, mask)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=5e-2, rtol=0)


def test_layout_built_on_device_matches_cpu_and_benchmark_stats():
    for shape, kernel, stride in [((256, 256), (80, 80), (16, 16)), ((30, 48, 80), (18, 24, 24), (1, 1, 1))]:
        spec = make_spec(shape, kernel, stride=stride)
        gpu = nl.get_layout(spec, (128, 128), DEV)
        cpu = nl.block_counts(spec, (128, 128))
        st = gpu.stats()
        assert (st["full"], st["partial"], st["empty"]) == (cpu["full"], cpu["partial"], cpu["empty"])
        assert gpu.device.type == "cuda" and gpu.perm_q.is_cuda


def test_module_on_gpu_matches_reference():
    m = NeighborhoodAttention2D(256, 4, (21, 21), dilation=(2, 1)).to(DEV, torch.bfloat16)
    x = torch.randn(1, 64, 96, 256, device=DEV, dtype=torch.bfloat16)
    y = m(x)
    B, N = 1, 64 * 96
    with torch.no_grad():
        q, k, v = m.qkv(x.reshape(B, N, 256)).reshape(B, N, 3, 4, 64).permute(2, 0, 3, 1, 4).unbind(0)
        spec = make_spec((64, 96), (21, 21), (2, 1))
        rows = torch.arange(N, device=DEV)[:: 7]
        o = rows_reference(q, k, v, spec, rows).to(torch.bfloat16)
        ref = m.proj(o.transpose(1, 2).reshape(B, -1, 256))
    torch.testing.assert_close(y.reshape(B, N, 256)[:, rows].float(), ref.float(), atol=3e-2, rtol=0)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("fuse", [False, True, "q"], ids=["copies", "fused", "fused_q"])
@pytest.mark.parametrize("heads_last", [False, True], ids=["bhnd", "bnhd"])
def test_permutation_modes_and_auto_blocks(fuse, heads_last, monkeypatch):
    """Every permutation mode at a real size with the automatic (128x64, 8x8 key sub-tiles) layout."""
    from visattn.kernels import triton_backend as tb
    shape, kernel = (128, 128), (40, 40)
    spec = make_spec(shape, kernel, num_global_tokens=(0, 77))
    assert nl.auto_block_size(spec, DEV, 128) == (128, 64)
    N = spec.seq_len
    x = torch.randn(3, 1, N, 4, 128, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) if heads_last else t.transpose(1, 2).contiguous() for t in x.unbind(0))
    monkeypatch.setattr(tb, "FUSE_PERMUTATION", fuse)
    out = neighborhood_attention(q, k, v, spatial_shape=shape, kernel_size=kernel, num_global_tokens=(0, 77),
                                 backend="triton")
    assert out.transpose(1, 2).is_contiguous() == heads_last
    rows = torch.cat([torch.randint(0, N, (254,), device=DEV), torch.arange(N - 2, N, device=DEV)])
    torch.testing.assert_close(out[:, :, rows].float(), rows_reference(q, k, v, spec, rows), atol=2e-2, rtol=0)
