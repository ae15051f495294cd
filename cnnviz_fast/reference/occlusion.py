"""Reference of the occlusion sweep kernels: occluded copies and the scatter of score drops."""
import torch


def window_masks_ref(positions: torch.Tensor, window, H: int, W: int) -> torch.Tensor:
    """[P, H, W] bool: pixel inside the window at (top, left), clipped at the image border."""
    wh, ww = window
    top, left = positions[:, 0, None], positions[:, 1, None]
    rows = torch.arange(H, device=positions.device)
    cols = torch.arange(W, device=positions.device)
    in_rows = (rows >= top) & (rows < top + wh)
    in_cols = (cols >= left) & (cols < left + ww)
    return in_rows[:, :, None] & in_cols[:, None, :]


def occlusion_copies_ref(images, baselines, image_index, positions, window):
    """[P, C, H, W]: copy p is ``images[image_index[p]]`` with the window at ``positions[p]``
    replaced by the same pixels of ``baselines[image_index[p]]``."""
    mask = window_masks_ref(positions, window, images.shape[2], images.shape[3])[:, None]
    return torch.where(mask, baselines[image_index], images[image_index])


def occlusion_scatter_ref(drops, image_index, positions, window, sums, counts):
    """Add ``drops[p, j]`` over window p of image ``image_index[p]`` into ``sums [N, k, H, W]``
    and 1 into ``counts [N, H, W]``; returns the new ``(sums, counts)``."""
    mask = window_masks_ref(positions, window, sums.shape[2], sums.shape[3]).to(sums.dtype)
    sums = sums.index_add(0, image_index, drops[:, :, None, None].to(sums.dtype) * mask[:, None])
    counts = counts.index_add(0, image_index, mask.to(counts.dtype))
    return sums, counts
