import torch
import torch.nn.functional as F


# A map whose range is within rounding of its magnitude is constant: resizing a constant
# map by convex weights leaves a few ulps of noise that must not be stretched to [0, 1].
CONSTANT_RTOL_ULPS = 16


def minmax_normalize_ref(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling of [..., H, W] to [0, 1]; constant maps become zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    varies = span > CONSTANT_RTOL_ULPS * torch.finfo(maps.dtype).eps * torch.maximum(lo.abs(), hi.abs())
    return torch.where(varies, (maps - lo) / torch.where(varies, span, 1), 0)


def upsample_normalize_ref(maps: torch.Tensor, size, mode: str = "bilinear",
                           normalize: bool = True) -> torch.Tensor:
    """[B, k, h, w] -> [B, k, H, W]: F.interpolate (align_corners=False for bilinear), then
    per-map min-max normalization when ``normalize``. ``size=None`` keeps h, w."""
    out = maps if size is None else F.interpolate(
        maps, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)
    return minmax_normalize_ref(out) if normalize else out
