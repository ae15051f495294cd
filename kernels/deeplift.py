"""Triton kernel of deeplift_rescale_relu_grad: one elementwise pass over the input half and
the reference half of a stacked [inputs; references] batch."""
import torch
import triton
import triton.language as tl


@triton.jit
def _deeplift_rescale_relu_grad_kernel(grad_ptr, x_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + n + offs, mask=mask, other=0.0)
    ga = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    gb = tl.load(grad_ptr + n + offs, mask=mask, other=0.0)
    d = a - b
    small = tl.abs(d) < eps
    ratio = (tl.maximum(a, 0.0) - tl.maximum(b, 0.0)) / tl.where(small, 1.0, d)
    one = tl.full(a.shape, 1.0, a.dtype)
    zero = tl.zeros(a.shape, a.dtype)
    factor_a = tl.where(small, tl.where(a > 0.0, one, zero), ratio.to(a.dtype))
    factor_b = tl.where(small, tl.where(b > 0.0, one, zero), ratio.to(a.dtype))
    tl.store(out_ptr + offs, ga * factor_a, mask=mask)
    tl.store(out_ptr + n + offs, gb * factor_b, mask=mask)


def deeplift_rescale_relu_grad_triton(grad: torch.Tensor, x: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """grad, x [2N] contiguous -> out [2N] (written in place)."""
    n = x.numel() // 2
    block = 1024
    _deeplift_rescale_relu_grad_kernel[(triton.cdiv(n, block),)](grad, x, out, n, eps, BLOCK=block)
