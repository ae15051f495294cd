"""Argument checks shared by every public function: clear errors naming the argument."""
from __future__ import annotations

import math
import numbers

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


def check_map_size(name: str, maps: torch.Tensor) -> None:
    """Maps ``[..., h, w]`` must have ``h, w >= 1``: a zero-size map has nothing to resize or
    normalize (and would reach a kernel with empty rows)."""
    if maps.shape[-2] == 0 or maps.shape[-1] == 0:
        raise ValueError(f"{name}: has zero-size maps, shape {tuple(maps.shape)}; expected h, w >= 1")


def pair(name: str, value, minimum: int = 1) -> tuple:
    """An int or (h, w) as a validated pair of ints >= minimum."""
    vals = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return vals


def check_model(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def _first_conv(model: torch.nn.Module):
    return next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)


def check_input(model: torch.nn.Module, x, name: str = "x", ndim: int | tuple = 4) -> torch.Tensor:
    """The one check of an input batch against the model, before any work.

    ``x`` is a floating tensor of ``ndim`` dims with finite values, on the device and of the
    dtype of the model's floating parameters; a model whose first convolution is ``Conv{n}d``
    takes ``n + 2``-D batches. Raises naming ``name`` and what was expected."""
    check_model(model)
    check_tensor(name, x, ndim=ndim)
    conv = _first_conv(model)
    if conv is not None and x.dim() != conv.weight.dim():
        raise ValueError(f"{name}: expected a batch [B, C, {', '.join('HWD'[:conv.weight.dim() - 2])}] for a "
                         f"model of {type(conv).__name__} layers, got shape {tuple(x.shape)}"
                         + ("; add a batch axis with x[None]" if x.dim() == conv.weight.dim() - 1 else ""))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        if param.device != x.device:
            raise ValueError(f"{name}: is on {x.device} but the model's parameters are on {param.device}; "
                             f"move one of them (x.to(device))")
        if param.dtype != x.dtype:
            raise TypeError(f"{name}: is {x.dtype} but the model's parameters are {param.dtype}; convert "
                            f"the input (x.to({param.dtype}); torch.from_numpy gives float64) or the model")
    if conv is not None and x.shape[1] != conv.in_channels:
        hint = {1: "; repeat a grayscale channel with x.expand(-1, 3, -1, -1)",
                4: "; drop the alpha channel of RGBA images with x[:, :3]"}.get(x.shape[1], "")
        raise ValueError(f"{name}: has {x.shape[1]} channels (shape {tuple(x.shape)}) but the model's first "
                         f"convolution takes {conv.in_channels}{hint if conv.in_channels == 3 else ''}")
    check_finite(name, x)
    return x


def check_finite(name: str, t: torch.Tensor, what: str = "values") -> None:
    """Raise ``ValueError`` naming the first NaN or Inf element of ``t``."""
    if bool(torch.isfinite(t.sum())):  # one reduction: any NaN or Inf makes the sum non-finite
        return
    bad = ~torch.isfinite(t)  # or the sum overflowed: look element by element
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: has non-finite {what} ({int(bad.sum())} NaN or Inf, the first at index "
                         f"{where}: {t[where].item()})")


def check_number(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, none: bool = False):
    """A finite real number (an int when ``integer``) in ``[low, high]`` (open ends where asked;
    ``None`` allowed when ``none``). Raises naming ``name`` and the domain."""
    if value is None and none:
        return None
    if low is not None and high is not None:
        domain = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        domain = f" {'>' if low_open else '>='} {low}"
    else:
        domain = "" if high is None else f" {'<' if high_open else '<='} {high}"
    expected = f"{'an int' if integer else 'a finite number'}{domain}" + (" or None" if none else "")
    real = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not real:
        raise TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
            or (high is not None and (value > high or (high_open and value == high))):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_choice(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
