"""Argument checks shared by every public function: clear errors naming the argument."""
from __future__ import annotations

import torch


def check_tensor(name: str, t, ndim: int | tuple | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in items)
        raise ValueError(f"tensors must share one device, got {listing}")


def check_model_device(model: torch.nn.Module, x: torch.Tensor) -> None:
    param = next(iter(model.parameters()), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"x: is on {x.device} but the model's parameters are on {param.device}")


def pair(name: str, value, minimum: int = 1) -> tuple:
    """An int or (h, w) as a validated pair of ints >= minimum."""
    vals = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return vals
