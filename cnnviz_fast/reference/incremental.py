import torch


def incremental_gather_ref(clean: torch.Tensor, region: torch.Tensor, region_offsets: torch.Tensor,
                           target_offsets: torch.Tensor, size, fill: float = 0.0) -> torch.Tensor:
    """Windows of a clean map overlaid with per-patch updated regions (incremental inference).

    clean ``[C, H, W]`` (shared by all patches), region ``[P, C, rh, rw]`` whose top-left
    corner in the map is ``region_offsets[p]`` (``[P, 2]`` long, (top, left)), windows of
    ``size = (th, tw)`` at ``target_offsets[p]`` (may extend past the map). Returns
    ``[P, C, th, tw]``: the region's value where the window meets the region, else the clean
    value, and ``fill`` outside the map (0 for zero padding, -inf for max pooling).
    """
    P, C = region.shape[:2]
    rh, rw = region.shape[2:]
    H, W = clean.shape[1:]
    th, tw = size
    ys = target_offsets[:, 0, None] + torch.arange(th, device=clean.device)  # [P, th]
    xs = target_offsets[:, 1, None] + torch.arange(tw, device=clean.device)  # [P, tw]
    in_map = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
    clean_vals = clean[:, ys.clamp(0, H - 1)[:, :, None], xs.clamp(0, W - 1)[:, None, :]]  # [C, P, th, tw]
    out = torch.where(in_map[:, None], clean_vals.transpose(0, 1), fill)
    if rh == 0 or rw == 0:
        return out
    ry = ys - region_offsets[:, 0, None]
    rx = xs - region_offsets[:, 1, None]
    in_region = ((ry >= 0) & (ry < rh))[:, :, None] & ((rx >= 0) & (rx < rw))[:, None, :] & in_map
    p = torch.arange(P, device=clean.device)[:, None, None]
    region_vals = region[p, :, ry.clamp(0, rh - 1)[:, :, None], rx.clamp(0, rw - 1)[:, None, :]]  # [P, th, tw, C]
    return torch.where(in_region[:, None], region_vals.permute(0, 3, 1, 2), out)
