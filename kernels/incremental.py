"""Triton kernel of incremental_gather: one program per (patch, channel, row block); each
program walks the window's columns in blocks, choosing region, clean or fill per element."""
import torch
import triton
import triton.language as tl


@triton.jit
def _incremental_gather_kernel(clean_ptr, region_ptr, region_off_ptr, target_off_ptr, out_ptr,
                               C, H, W, rh, rw, th, tw, fill,
                               BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pc = tl.program_id(0).to(tl.int64)
    p = pc // C
    c = pc % C
    ty = tl.load(target_off_ptr + 2 * p)
    tx = tl.load(target_off_ptr + 2 * p + 1)
    ry = tl.load(region_off_ptr + 2 * p)
    rx = tl.load(region_off_ptr + 2 * p + 1)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    y = ty + rows
    row_ok = rows < th
    row_in_map = (y >= 0) & (y < H)
    row_in_region = (y >= ry) & (y < ry + rh)
    clean = clean_ptr + c * H * W
    region = region_ptr + pc * rh * rw
    out = out_ptr + pc * th * tw
    for start in range(0, tw, BLOCK_W):
        cols = start + tl.arange(0, BLOCK_W)
        x = tx + cols
        ok = row_ok[:, None] & (cols < tw)[None, :]
        in_map = row_in_map[:, None] & ((x >= 0) & (x < W))[None, :]
        in_region = in_map & row_in_region[:, None] & ((x >= rx) & (x < rx + rw))[None, :]
        from_clean = ok & in_map & ~in_region
        from_region = ok & in_region
        v_clean = tl.load(clean + y[:, None] * W + x[None, :], mask=from_clean, other=0.0)
        v_region = tl.load(region + (y - ry)[:, None] * rw + (x - rx)[None, :], mask=from_region, other=0.0)
        v = tl.where(in_region, v_region, tl.where(in_map, v_clean, fill))
        tl.store(out + rows[:, None] * tw + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=ok)


def incremental_gather_triton(clean: torch.Tensor, region: torch.Tensor, region_offsets: torch.Tensor,
                              target_offsets: torch.Tensor, out: torch.Tensor, fill: float) -> None:
    """clean [C, H, W], region [P, C, rh, rw], offsets [P, 2] int64, out [P, C, th, tw] (written)."""
    C, H, W = clean.shape
    P, _, th, tw = out.shape
    rh, rw = region.shape[2:]
    block_w = min(128, triton.next_power_of_2(tw))
    block_r = max(1, min(triton.next_power_of_2(th), 1024 // block_w))
    grid = (P * C, triton.cdiv(th, block_r))
    _incremental_gather_kernel[grid](clean, region, region_offsets, target_offsets, out,
                                     C, H, W, rh, rw, th, tw, fill,
                                     BLOCK_R=block_r, BLOCK_W=block_w)
