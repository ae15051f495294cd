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


def load_image(path, size=None) -> torch.Tensor:
    """Read an image file (PNG, JPEG, ...; grayscale and RGBA become RGB) as ``[1, 3, H, W]``
    float32 in [0, 1], the batch the methods take. size: an int or ``(H, W)``, bilinear resize
    (aspect not kept); None keeps the file's size."""
    from PIL import Image

    from ._checks import pair
    from .data import _to_tensor
    size = None if size is None else pair("size", size)
    with Image.open(path) as image:
        return _to_tensor(image, size)[None]
