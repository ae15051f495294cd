"""Triton kernel of deeplift_rescale_relu: one elementwise pass over the input half and the
reference half of a stacked [inputs; references] batch."""
import torch
import triton
import triton.language as tl


@triton.jit
def _deeplift_rescale_relu_kernel(x_ptr, out_ptr, factor_ptr, fallback_ptr, n, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + n + offs, mask=mask, other=0.0)
    ra = tl.maximum(a, 0.0)
    rb = tl.maximum(b, 0.0)
    d = a - b
    small = tl.abs(d) < eps
    ratio = (ra - rb) / tl.where(small, 1.0, d)
    one = tl.full(a.shape, 1.0, a.dtype)
    zero = tl.zeros(a.shape, a.dtype)
    tl.store(out_ptr + offs, ra, mask=mask)
    tl.store(out_ptr + n + offs, rb, mask=mask)
    tl.store(factor_ptr + offs, tl.where(small, tl.where(a > 0.0, one, zero), ratio.to(a.dtype)), mask=mask)
    tl.store(factor_ptr + n + offs, tl.where(small, tl.where(b > 0.0, one, zero), ratio.to(a.dtype)), mask=mask)
    tl.store(fallback_ptr + offs, small.to(tl.int8), mask=mask)


def deeplift_rescale_relu_triton(x: torch.Tensor, eps: float, out: torch.Tensor, factor: torch.Tensor,
                                 fallback: torch.Tensor) -> None:
    """x [2N] contiguous -> out, factor [2N], fallback [N] (bool, written as int8 in place)."""
    n = fallback.numel()
    block = 1024
    _deeplift_rescale_relu_kernel[(triton.cdiv(n, block),)](x, out, factor, fallback.view(torch.int8), n, eps,
                                                           BLOCK=block)
