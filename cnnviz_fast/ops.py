"""The dispatch point of every fast operation: reference, C++ or Triton by device.

Each function here validates its arguments, asks ``_backend.choose`` which implementation
runs, and calls it. The references live in ``cnnviz_fast.reference`` and are always
reachable by name (``backend="reference"``).
"""
from __future__ import annotations

import torch

from . import _backend
from ._checks import check_same_device, check_tensor, pair
from .reference import deeplift_rescale_relu_grad_ref, upsample_normalize_ref

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


def deeplift_rescale_relu_grad(grad: torch.Tensor, x: torch.Tensor, eps: float = 1e-10,
                               backend: str | None = None) -> torch.Tensor:
    """The backward of the DeepLIFT rescale rule on ReLU in one pass (Captum ``DeepLift``'s
    ``nonlinear``): ``grad * factor`` with the multiplier computed on the fly from ``x``.

    x: the ReLU's float input ``[2N, ...]`` holding ``[inputs; references]`` (even first
    dimension); grad: the output gradient, same shape. ``factor`` is ``(relu(x_in) -
    relu(x_ref)) / (x_in - x_ref)`` on both halves, or each half's ``x > 0`` where
    ``|x_in - x_ref| < eps``. Returns ``[2N, ...]``, same dtype and device as ``x``.
    """
    check_tensor("x", x)
    check_tensor("grad", grad)
    check_same_device(grad=grad, x=x)
    if x.dim() < 1 or x.shape[0] % 2:
        raise ValueError(f"x: expected [inputs; references] with an even first dimension, got shape {tuple(x.shape)}")
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad: expected x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(grad.shape)} {grad.dtype}")
    impl = _backend.choose("deeplift_rescale_relu_grad", x, backend)
    if impl == "reference":
        return deeplift_rescale_relu_grad_ref(grad, x, eps)
    grad, x = grad.detach().contiguous(), x.detach().contiguous()
    out = torch.empty_like(x)
    if impl == "cpp":
        _backend.cpp_module().deeplift_rescale_relu_grad_cpu(grad.numpy(), x.numpy(), eps, out.numpy())
    else:
        from .kernels.deeplift import deeplift_rescale_relu_grad_triton
        deeplift_rescale_relu_grad_triton(grad, x, eps, out)
    return out
