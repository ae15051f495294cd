"""Triton kernel of upsample_normalize: one program per map, two passes over the output
positions (min/max of the resized values, then recompute, normalize and store once)."""
import numpy as np
import torch
import triton
import triton.language as tl

from ..reference.upsample import CONSTANT_RTOL_ULPS


@triton.jit
def _resized_values(src, offs, mask, h, w, W, scale_h, scale_w, BILINEAR: tl.constexpr):
    # Source indices and weights as ATen's upsample_bilinear2d / nearest compute them.
    i = (offs // W).to(tl.float32)
    j = (offs % W).to(tl.float32)
    if BILINEAR:
        sy = tl.maximum(scale_h * (i + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_w * (j + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = y0 + (y0 < h - 1).to(tl.int32)
        x1 = x0 + (x0 < w - 1).to(tl.int32)
        ly = tl.minimum(tl.maximum(sy - y0.to(tl.float32), 0.0), 1.0)
        lx = tl.minimum(tl.maximum(sx - x0.to(tl.float32), 0.0), 1.0)
        v00 = tl.load(src + y0 * w + x0, mask=mask, other=0.0)
        v01 = tl.load(src + y0 * w + x1, mask=mask, other=0.0)
        v10 = tl.load(src + y1 * w + x0, mask=mask, other=0.0)
        v11 = tl.load(src + y1 * w + x1, mask=mask, other=0.0)
        top = (1.0 - lx) * v00 + lx * v01
        bottom = (1.0 - lx) * v10 + lx * v11
        value = (1.0 - ly) * top + ly * bottom
    else:
        y = tl.minimum((i * scale_h).to(tl.int32), h - 1)
        x = tl.minimum((j * scale_w).to(tl.int32), w - 1)
        value = tl.load(src + y * w + x, mask=mask, other=0.0)
    return value


@triton.jit
def _upsample_normalize_kernel(src_ptr, out_ptr, h, w, H, W, scale_h, scale_w,
                               BILINEAR: tl.constexpr, NORMALIZE: tl.constexpr,
                               CONSTANT_ULPS: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    src = src_ptr + m * h * w
    dst = out_ptr + m * H * W
    n = H * W
    lo = 0.0
    inv = 1.0
    if NORMALIZE:
        lo_acc = tl.full([BLOCK], float("inf"), tl.float32)
        hi_acc = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            v = _resized_values(src, offs, mask, h, w, W, scale_h, scale_w, BILINEAR)
            lo_acc = tl.minimum(lo_acc, tl.where(mask, v, float("inf")))
            hi_acc = tl.maximum(hi_acc, tl.where(mask, v, float("-inf")))
        lo = tl.min(lo_acc, 0)
        hi = tl.max(hi_acc, 0)
        span = hi - lo
        # A constant map (range within rounding of its magnitude) carries no ranking: zeros.
        varies = span > CONSTANT_ULPS * 1.1920929e-07 * tl.maximum(tl.abs(lo), tl.abs(hi))
        inv = tl.where(varies, 1.0 / tl.where(varies, span, 1.0), 0.0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        v = _resized_values(src, offs, mask, h, w, W, scale_h, scale_w, BILINEAR)
        if NORMALIZE:
            v = (v - lo) * inv
        tl.store(dst + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def upsample_normalize_triton(maps: torch.Tensor, out: torch.Tensor, bilinear: bool,
                              normalize: bool) -> None:
    """maps [N, h, w] contiguous -> out [N, H, W] (written in place)."""
    n, h, w = maps.shape
    _, H, W = out.shape
    # Scales rounded as ATen rounds them: float32 division of the sizes.
    scale_h = float(np.float32(h) / np.float32(H))
    scale_w = float(np.float32(w) / np.float32(W))
    block = min(1024, triton.next_power_of_2(H * W))
    _upsample_normalize_kernel[(n,)](maps, out, h, w, H, W, scale_h, scale_w,
                                     BILINEAR=bilinear, NORMALIZE=normalize,
                                     CONSTANT_ULPS=CONSTANT_RTOL_ULPS, BLOCK=block)
