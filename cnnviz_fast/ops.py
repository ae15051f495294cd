"""The dispatch point of every fast operation: reference, C++ or Triton by device.

Each function here validates its arguments, asks ``_backend.choose`` which implementation
runs, and calls it. The references live in ``cnnviz_fast.reference`` and are always
reachable by name (``backend="reference"``).
"""
from __future__ import annotations

import torch

from . import _backend
from ._checks import check_same_device, check_tensor, pair
from .reference import incremental_gather_ref, upsample_normalize_ref

_MODES = ("bilinear", "nearest")


def upsample_normalize(maps: torch.Tensor, size=None, mode: str = "bilinear",
                       normalize: bool = True, backend: str | None = None) -> torch.Tensor:
    """Resize heatmaps and min-max normalize each one, in one pass.

    maps: float tensor ``[B, k, h, w]`` on any device. size: ``(H, W)``, an int, or None
    (keep ``h, w``). mode: ``"bilinear"`` (equals ``F.interpolate(mode="bilinear",
    align_corners=False)``, as pytorch-grad-cam and Captum's ``LayerAttribution.interpolate``
    resize) or ``"nearest"`` (``F.interpolate(mode="nearest")``). normalize: scale each map to
    [0, 1] by its min and max; a constant map gives zeros, never NaN.
    Returns ``[B, k, H, W]`` of the input's dtype on the input's device.
    """
    check_tensor("maps", maps, ndim=4)
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    out_size = tuple(maps.shape[-2:]) if size is None else pair("size", size)
    impl = _backend.choose("upsample_normalize", maps, backend)
    if impl == "reference":
        return upsample_normalize_ref(maps, out_size, mode, normalize)
    B, k, h, w = maps.shape
    src = maps.contiguous().view(B * k, h, w)
    out = torch.empty((B * k, *out_size), dtype=maps.dtype, device=maps.device)
    if impl == "cpp":
        _backend.cpp_module().upsample_normalize_cpu(src.detach().numpy(), out.numpy(), mode == "bilinear", normalize)
    else:
        from .kernels.upsample import upsample_normalize_triton
        upsample_normalize_triton(src, out, mode == "bilinear", normalize)
    return out.view(B, k, *out_size)


def incremental_gather(clean: torch.Tensor, region: torch.Tensor, region_offsets: torch.Tensor,
                       target_offsets: torch.Tensor, size, fill: float = 0.0,
                       backend: str | None = None) -> torch.Tensor:
    """Per-patch windows of a clean activation overlaid with updated regions, in one pass.

    The gather/overlay step of incremental inference (Krypton, Nakandala et al. SIGMOD 2019):
    clean ``[C, H, W]`` is the activation of the unoccluded image, shared by all patches;
    region ``[P, C, rh, rw]`` holds each patch's recomputed values, its top-left corner at
    ``region_offsets[p]`` (``[P, 2]`` int64 (top, left)); the window of ``size = (th, tw)``
    starts at ``target_offsets[p]`` and may extend past the map (a layer's halo). Returns
    ``[P, C, th, tw]`` of clean's dtype on clean's device: region values where the window
    meets the region, clean values elsewhere in the map, ``fill`` outside it (0.0 for zero
    padding, ``-inf`` for max pooling). ``rh`` or ``rw`` may be 0 (a plain windowed gather).
    """
    check_tensor("clean", clean, ndim=3)
    check_tensor("region", region, ndim=4)
    for name, off in (("region_offsets", region_offsets), ("target_offsets", target_offsets)):
        check_tensor(name, off, ndim=2, floating=False)
        if off.dtype != torch.int64 or off.shape != (region.shape[0], 2):
            raise ValueError(f"{name}: expected an int64 tensor of shape [{region.shape[0]}, 2], "
                             f"got {off.dtype} {tuple(off.shape)}")
    check_same_device(clean=clean, region=region, region_offsets=region_offsets, target_offsets=target_offsets)
    if region.shape[1] != clean.shape[0] or region.dtype != clean.dtype:
        raise ValueError(f"region: expected [P, {clean.shape[0]}, rh, rw] of {clean.dtype}, "
                         f"got {tuple(region.shape)} of {region.dtype}")
    th, tw = pair("size", size)
    impl = _backend.choose("incremental_gather", clean, backend)
    if impl == "reference":
        return incremental_gather_ref(clean, region, region_offsets, target_offsets, (th, tw), fill)
    out = torch.empty((region.shape[0], clean.shape[0], th, tw), dtype=clean.dtype, device=clean.device)
    if impl == "cpp":
        _backend.cpp_module().incremental_gather_cpu(
            clean.detach().contiguous().numpy(), region.detach().contiguous().numpy(),
            region_offsets.contiguous().numpy(), target_offsets.contiguous().numpy(), out.numpy(), float(fill))
    else:
        from .kernels.incremental import incremental_gather_triton
        incremental_gather_triton(clean.contiguous(), region.contiguous(), region_offsets.contiguous(),
                                  target_offsets.contiguous(), out, float(fill))
    return out
