"""Triton kernel of gram and its backward: one batched ``scale * X @ Y^T`` on strided views.

Forward: X = Y = F [C, K], out = G [C, C]. Backward: X = dG [C, C], symmetrized on load
(``dG + dG^T``), Y = F^T (F read through swapped strides, no copy), out = dF [C, K].
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _gram_kernel(x_ptr, y_ptr, out_ptr, M, N, K, scale,
                 sx_b, sx_m, sx_k, sy_b, sy_n, sy_k, so_b, so_m, so_n,
                 SYMMETRIZE_X: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    x_base = x_ptr + b * sx_b
    y_base = y_ptr + b * sy_b
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_x = (rm[:, None] < M) & (kk[None, :] < K)
        x = tl.load(x_base + rm[:, None] * sx_m + kk[None, :] * sx_k, mask=mask_x, other=0.0)
        if SYMMETRIZE_X:
            x += tl.load(x_base + kk[None, :] * sx_m + rm[:, None] * sx_k, mask=mask_x, other=0.0)
        mask_y = (rn[:, None] < N) & (kk[None, :] < K)
        y = tl.load(y_base + rn[:, None] * sy_n + kk[None, :] * sy_k, mask=mask_y, other=0.0)
        acc += tl.dot(x, tl.trans(y), input_precision="ieee")
    mask_o = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + b * so_b + rm[:, None] * so_m + rn[None, :] * so_n,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_o)


def _launch(x, y, out, scale, symmetrize):
    B, M, K = x.shape
    N = y.shape[1]
    block_m, block_n, block_k = 32, 32, 32
    grid = (B, triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _gram_kernel[grid](x, y, out, M, N, K, scale, *x.stride(), *y.stride(), *out.stride(),
                       SYMMETRIZE_X=symmetrize, ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def gram_triton(x: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """x [B, C, K] -> out [B, C, C] = scale * x x^T (written in place)."""
    _launch(x, x, out, scale, False)


def gram_backward_triton(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """grad [B, C, C], x [B, C, K] -> out [B, C, K] = scale * (grad + grad^T) x (in place)."""
    _launch(grad, x.transpose(1, 2), out, scale, True)
