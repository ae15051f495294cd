"""Input patches of top-k results: each unit's receptive field cropped from its image, with
the part that lies outside the image (the network saw zero padding there) marked."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .activations import TopKResult
from .receptive import ReceptiveField
from ..viz import image_grid


class Patches(NamedTuple):
    """images ``[C', k, 3, S_h, S_w]`` (``fill`` outside the image and in empty slots);
    inside ``[C', k, S_h, S_w]`` bool, True where the pixel lies in the image."""

    images: torch.Tensor
    inside: torch.Tensor


def _image(images, index: int) -> torch.Tensor:
    item = images[index]
    return item[0] if isinstance(item, (tuple, list)) else item


def crop_patches(images, result: TopKResult, receptive_field: ReceptiveField, fill: float = 0.0) -> Patches:
    """Crop, for every channel and rank of ``result`` (one layer of ``top_k_patches``), the
    receptive field of the recorded unit from the image with the recorded id.

    images: a tensor ``[N, 3, H, W]`` indexed by id, or a dataset whose item ``id`` is an
    image or a tuple starting with one (``cnnviz_fast.data.image_folder``). The field is
    ``receptive_field.box(y, x)`` (from ``receptive_field(model, layer, (H, W))``), unclipped:
    where it reaches past the border the patch holds ``fill`` and ``inside`` is False.
    Returns ``Patches`` on the images' device.
    """
    if not isinstance(result, TopKResult):
        raise TypeError(f"result: expected a TopKResult (one layer of top_k_patches), got {type(result).__name__}")
    if not isinstance(receptive_field, ReceptiveField):
        raise TypeError(f"receptive_field: expected a ReceptiveField, got {type(receptive_field).__name__}")
    if tuple(receptive_field.feature_size) != tuple(result.feature_size):
        raise ValueError(f"receptive_field: computed for a {receptive_field.feature_size} feature map, the "
                         f"result's layer has {result.feature_size} (another layer or input size?)")
    first = _image(images, 0)
    if first.dim() != 3 or tuple(first.shape[1:]) != tuple(receptive_field.input_size):
        raise ValueError(f"images: expected images [3, {receptive_field.input_size[0]}, "
                         f"{receptive_field.input_size[1]}] (the receptive field's input size), got "
                         f"{list(first.shape)}")
    C, k = result.ids.shape
    (S_h, S_w), (H, W) = receptive_field.size, receptive_field.input_size
    out = torch.full((C, k, first.shape[0], S_h, S_w), fill, dtype=first.dtype, device=first.device)
    inside = torch.zeros((C, k, S_h, S_w), dtype=torch.bool, device=first.device)
    ids, positions = result.ids.tolist(), result.positions.tolist()
    for c in range(C):
        for r in range(k):
            if ids[c][r] < 0:
                continue
            top, left, bottom, right = receptive_field.box(*positions[c][r])
            t, b, lft, rgt = max(top, 0), min(bottom, H), max(left, 0), min(right, W)
            if t >= b or lft >= rgt:
                continue
            image = _image(images, ids[c][r])
            out[c, r, :, t - top:b - top, lft - left:rgt - left] = image[:, t:b, lft:rgt]
            inside[c, r, t - top:b - top, lft - left:rgt - left] = True
    return Patches(out, inside)


def patch_grid(patches: Patches, outside: float = 0.5, padding: int = 2) -> torch.Tensor:
    """One image of ``patches``: a row per channel, the k patches best first; pixels outside
    the image (and empty slots) are painted ``outside`` (grey). Returns ``[3, H', W']``."""
    if not isinstance(patches, Patches):
        raise TypeError(f"patches: expected the Patches of crop_patches, got {type(patches).__name__}")
    C, k = patches.inside.shape[:2]
    shown = torch.where(patches.inside[:, :, None], patches.images, torch.full_like(patches.images, outside))
    return image_grid(shown.flatten(0, 1), nrow=k, padding=padding)
