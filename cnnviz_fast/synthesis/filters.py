"""What a network's filters look like: conv weights as an image grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._hooks import resolve_layer
from ..viz import image_grid


def _normalize(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile min-max scaled to [0, 1] on its own (a constant tile becomes mid-grey)."""
    flat = tiles.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    scaled = torch.where((hi > lo)[:, None], (flat - lo[:, None]) / span[:, None], torch.full_like(flat, 0.5))
    return scaled.view_as(tiles)


def filter_grid(model: nn.Module, layer=None, *, scale: int = 8, padding: int = 1) -> torch.Tensor:
    """The filters of a convolution as one image, as AlexNet's Fig. 3 and the lectures show them.

    layer: a ``nn.Conv2d`` of the model (module or dotted name); None takes the model's first
    ``nn.Conv2d``. A conv with 3 input channels shows each filter ``[3, kh, kw]`` as one RGB
    tile (about sqrt(out) tiles a row); any other shows a grid of grey
    tiles, one row per filter and one column per input channel. Each tile is min-max
    normalized on its own, enlarged ``scale`` times (nearest) and framed by ``padding`` px of
    white. Returns float32 ``[3, H, W]`` in [0, 1] on the weights' device.
    """
    if layer is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(f"layer: {type(model).__name__} has no nn.Conv2d")
    else:
        conv = resolve_layer(model, layer)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"layer: expected an nn.Conv2d, got {type(conv).__name__}")
    for name, value in (("scale", scale), ("padding", padding)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "scale" else 0):
            raise ValueError(f"{name}: expected an int >= {1 if name == 'scale' else 0}, got {value!r}")
    weight = conv.weight.detach().float()
    out, inp, kh, kw = weight.shape
    if inp == 3:
        tiles, nrow = _normalize(weight), max(1, round(out ** 0.5))
    else:
        tiles, nrow = _normalize(weight.reshape(out * inp, 1, kh, kw)).expand(-1, 3, -1, -1), inp
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    return image_grid(tiles, nrow=nrow, padding=padding)
