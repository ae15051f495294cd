"""Pictures: heatmap overlays, image grids and atomic PNG writes (Pillow, matplotlib colormaps)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_write
from ._checks import check_tensor


def colorize(heatmaps: torch.Tensor, cmap: str = "jet") -> torch.Tensor:
    """[B, H, W] values in [0, 1] -> RGB [B, 3, H, W] float32 in [0, 1] through a matplotlib colormap."""
    from matplotlib import colormaps
    check_tensor("heatmaps", heatmaps, ndim=3)
    if cmap not in colormaps:
        raise ValueError(f"cmap: unknown matplotlib colormap {cmap!r}")
    lut = torch.as_tensor(colormaps[cmap](np.linspace(0, 1, 256))[:, :3], dtype=torch.float32,
                          device=heatmaps.device)
    idx = (heatmaps.detach().float().clamp(0, 1) * 255).round().long()
    return lut[idx].permute(0, 3, 1, 2)


def overlay(images: torch.Tensor, heatmaps: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> torch.Tensor:
    """Blend heatmaps over images, as pytorch-grad-cam's ``show_cam_on_image``.

    images: ``[B, 3, H, W]`` in [0, 1]; heatmaps: ``[B, H, W]`` in [0, 1] (e.g. a normalized
    CAM). Returns ``[B, 3, H, W]`` float32 in [0, 1]: ``(1 - alpha) * image + alpha * colour``.
    """
    check_tensor("images", images, ndim=4)
    check_tensor("heatmaps", heatmaps, ndim=3)
    if images.shape[1] != 3 or images.shape[0] != heatmaps.shape[0] or images.shape[2:] != heatmaps.shape[1:]:
        raise ValueError(f"heatmaps: expected [B, H, W] matching images [B, 3, H, W], got "
                         f"{tuple(heatmaps.shape)} for images {tuple(images.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    colour = colorize(heatmaps.to(images.device), cmap)
    return ((1 - alpha) * images.detach().float() + alpha * colour).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``[N, C, h, w]`` images row by row into one ``[C, H, W]`` image (C = 1 or 3)."""
    check_tensor("images", images, ndim=4)
    if nrow < 1:
        raise ValueError(f"nrow: expected >= 1, got {nrow}")
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    cols = min(n, nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def to_pil(image):
    """``[3, H, W]`` or ``[H, W]`` in [0, 1], or a matplotlib Figure -> a Pillow image."""
    from PIL import Image
    if hasattr(image, "savefig"):  # a matplotlib Figure, rendered at screen resolution
        buf = io.BytesIO()
        image.savefig(buf, format="png", dpi=80)
        return Image.open(buf).convert("RGB")
    check_tensor("image", image, ndim=(2, 3))
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(arr if arr.ndim == 2 else arr.transpose(1, 2, 0))


def save_image(image, path) -> Path:
    """Write ``[3, H, W]`` or ``[H, W]`` in [0, 1] (or a matplotlib Figure) as a PNG, atomically
    (temp file + rename)."""
    path = Path(path)
    with atomic_write(path) as f:
        to_pil(image).save(f, format="PNG")
    return path


def outlier_scale(maps: torch.Tensor, outlier_perc: float = 2.0) -> torch.Tensor:
    """Per-map scale of Captum's ``visualize_image_attr``: the smallest ``|value|`` at which the
    cumulative sum of the sorted ``|values|`` reaches ``100 - outlier_perc`` percent of their
    total (``_cumulative_sum_threshold``). ``maps`` ``[B, H, W]`` -> ``[B]`` float32; a map of
    zeros gets scale 1."""
    check_tensor("maps", maps, ndim=3)
    if not 0.0 <= outlier_perc < 100.0:
        raise ValueError(f"outlier_perc: expected a value in [0, 100), got {outlier_perc}")
    flat = maps.detach().float().abs().flatten(1).sort(dim=1).values
    if flat.shape[1] == 0:
        return flat.new_ones(flat.shape[0])
    cum = flat.cumsum(1)
    first = (cum >= cum[:, -1:] * (1.0 - outlier_perc / 100.0)).float().argmax(1)
    scale = flat.gather(1, first[:, None])[:, 0]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def clip_maps(maps: torch.Tensor, signed: bool, outlier_perc: float = 2.0) -> torch.Tensor:
    """Maps ``[B, H, W]`` scaled by ``outlier_scale`` and clipped: to [-1, 1] when ``signed``
    (Captum's ``sign="all"``), else ``|maps|`` to [0, 1] (``sign="absolute_value"``)."""
    scaled = maps.detach().float() / outlier_scale(maps, outlier_perc)[:, None, None]
    return scaled.clamp(-1, 1) if signed else scaled.abs().clamp(0, 1)


SIGNED_CMAP = "RdBu_r"  # blue negative, white zero, red positive
UNSIGNED_CMAP = "jet"  # pytorch-grad-cam's show_cam_on_image colours


def heat_overlay(images: torch.Tensor, maps: torch.Tensor, signed: bool, outlier_perc: float = 2.0,
                 alpha: float = 0.5) -> torch.Tensor:
    """Pictures ``[B, 3, H, W]`` in [0, 1] of maps ``[B, H', W']`` (any scale; resized to the
    images) over images ``[B, 3, H, W]`` in [0, 1], after ``clip_maps``. Unsigned: the map on
    ``UNSIGNED_CMAP`` blended with ``alpha`` over the image. Signed: the map on the diverging
    ``SIGNED_CMAP`` over the image in grey, opaque where ``|value|`` is large and clear where it
    is near 0 (Captum's ``blended_heat_map`` with ``sign="all"``)."""
    check_tensor("images", images, ndim=4)
    check_tensor("maps", maps, ndim=3)
    maps = maps.detach().float().to(images.device)
    if maps.shape[-2:] != images.shape[-2:]:
        maps = torch.nn.functional.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                                               align_corners=False)[:, 0]
    values = clip_maps(maps, signed, outlier_perc)
    if not signed:
        return overlay(images, values, alpha, UNSIGNED_CMAP)
    grey = images.detach().float().mean(1, keepdim=True).expand_as(images)
    colour = colorize((values + 1) / 2, SIGNED_CMAP)
    weight = values.abs()[:, None] * 0.85
    return ((1 - weight) * (0.35 + 0.5 * grey) + weight * colour).clamp(0, 1)


def colormap_stops(cmap: str, n: int = 9) -> list:
    """``n`` evenly spaced colours of a matplotlib colormap as ``#rrggbb`` strings (colour bars)."""
    from matplotlib import colormaps
    if cmap not in colormaps:
        raise ValueError(f"cmap: unknown matplotlib colormap {cmap!r}")
    rgb = (colormaps[cmap](np.linspace(0, 1, n))[:, :3] * 255).round().astype(int)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb]
