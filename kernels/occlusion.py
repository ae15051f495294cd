"""Triton kernels of the occlusion sweep: occluded copies written straight into the batch
buffer, and the scatter of score drops with their counts (atomic adds, one program per
window and output plane)."""
import triton
import triton.language as tl


@triton.jit
def _occlusion_copies_kernel(img_ptr, base_ptr, idx_ptr, pos_ptr, out_ptr, C, H, W, WH, WW,
                             BLOCK: tl.constexpr):
    pc = tl.program_id(0).to(tl.int64)  # one (copy, channel) plane per row of the grid
    p = pc // C
    c = pc % C
    n = tl.load(idx_ptr + p)
    top = tl.load(pos_ptr + 2 * p)
    left = tl.load(pos_ptr + 2 * p + 1)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    r = offs // W
    col = offs % W
    inside = (r >= top) & (r < top + WH) & (col >= left) & (col < left + WW)
    src = (n * C + c) * H * W + offs
    v = tl.load(img_ptr + src, mask=mask & ~inside, other=0.0)
    b = tl.load(base_ptr + src, mask=mask & inside, other=0.0)
    tl.store(out_ptr + pc * H * W + offs, tl.where(inside, b, v), mask=mask)


@triton.jit
def _occlusion_scatter_kernel(drops_ptr, idx_ptr, pos_ptr, sums_ptr, counts_ptr, K, H, W, WH, WW,
                              BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)  # j < K: drop j into its sums plane; j == K: the counts plane
    n = tl.load(idx_ptr + p)
    top = tl.load(pos_ptr + 2 * p)
    left = tl.load(pos_ptr + 2 * p + 1)
    if j < K:
        plane = sums_ptr + (n * K + j) * H * W
        value = tl.load(drops_ptr + p * K + j)
    else:
        plane = counts_ptr + n * H * W
        value = 1.0
    for start in range(0, WH * WW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        r = top + offs // WW
        col = left + offs % WW
        mask = (offs < WH * WW) & (r < H) & (col < W)
        tl.atomic_add(plane + r * W + col, tl.zeros([BLOCK], sums_ptr.dtype.element_ty) + value, mask=mask)


def occlusion_copies_triton(images, baselines, image_index, positions, window, out) -> None:
    """images, baselines [N, C, H, W] contiguous -> out [P, C, H, W] (written in place)."""
    _, C, H, W = images.shape
    P = image_index.shape[0]
    block = min(1024, triton.next_power_of_2(H * W))
    grid = (P * C, triton.cdiv(H * W, block))
    _occlusion_copies_kernel[grid](images, baselines, image_index, positions, out, C, H, W,
                                   window[0], window[1], BLOCK=block)


def occlusion_scatter_triton(drops, image_index, positions, window, sums, counts) -> None:
    """drops [P, k] -> accumulated into sums [N, k, H, W] and counts [N, H, W]."""
    P, k = drops.shape
    _, _, H, W = sums.shape
    block = min(1024, triton.next_power_of_2(window[0] * window[1]))
    _occlusion_scatter_kernel[(P, k + 1)](drops, image_index, positions, sums, counts, k, H, W,
                                          window[0], window[1], BLOCK=block)
