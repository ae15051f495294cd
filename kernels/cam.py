"""Triton kernel of cam_combine: one program per output map. It writes the weighted channel
sum (ReLU'd) of its map to a small float32 buffer, then resizes and normalizes that buffer with
the body of the upsample_normalize kernel, called inline in the same program."""
import numpy as np
import torch
import triton
import triton.language as tl

from ..reference.upsample import CONSTANT_RTOL_ULPS
from .upsample import _upsample_normalize_kernel


@triton.jit
def _cam_combine_kernel(act_ptr, w_ptr, map_ptr, out_ptr, k, K, h, w, H, W, w_stride,
                        scale_h, scale_w, ELEMENTWISE: tl.constexpr, RELU: tl.constexpr,
                        NORMALIZE: tl.constexpr, CONSTANT_ULPS: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    hw = h * w
    act = act_ptr + (m // k) * K * hw
    wts = w_ptr + m * w_stride
    for start in range(0, hw, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        p_mask = p < hw
        acc = tl.zeros([BLOCK_HW], tl.float32)
        for c0 in range(0, K, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_mask = c < K
            tile_mask = c_mask[:, None] & p_mask[None, :]
            a = tl.load(act + c[:, None] * hw + p[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            if ELEMENTWISE:
                wv = tl.load(wts + c[:, None] * hw + p[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            else:
                wv = tl.load(wts + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
            acc += tl.sum(a * wv, axis=0)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(map_ptr + m * hw + p, acc, mask=p_mask)
    # The resize below reads positions other threads of this program wrote.
    tl.debug_barrier()
    _upsample_normalize_kernel(map_ptr, out_ptr, h, w, H, W, scale_h, scale_w, True, NORMALIZE,
                               CONSTANT_ULPS, BLOCK)


def cam_combine_triton(activations: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                       relu: bool, normalize: bool) -> None:
    """activations [B, K, h, w], weights [B, k, K] or [B, k, K, h, w], all contiguous ->
    out [B, k, H, W] (written in place)."""
    B, K, h, w = activations.shape
    k, H, W = out.shape[1:]
    elementwise = weights.dim() == 5
    maps = torch.empty((B * k, h * w), dtype=torch.float32, device=activations.device)
    # Scales rounded as ATen rounds them: float32 division of the sizes.
    scale_h = float(np.float32(h) / np.float32(H))
    scale_w = float(np.float32(w) / np.float32(W))
    block_hw = min(128, triton.next_power_of_2(h * w))
    block_k = min(max(4096 // block_hw, 1), triton.next_power_of_2(K))
    _cam_combine_kernel[(B * k,)](activations, weights, maps, out, k, K, h, w, H, W,
                                  K * h * w if elementwise else K, scale_h, scale_w,
                                  ELEMENTWISE=elementwise, RELU=relu, NORMALIZE=normalize,
                                  CONSTANT_ULPS=CONSTANT_RTOL_ULPS, BLOCK_K=block_k,
                                  BLOCK_HW=block_hw, BLOCK=min(1024, triton.next_power_of_2(H * W)))
