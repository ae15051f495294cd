"""Mixed precision and channels-last for the explanation methods: one converted copy of the
model per call, the user's model untouched.

``compute_dtype`` (e.g. ``torch.bfloat16``) runs the *body* of the network in that precision
on a copy whose parameters and buffers are converted once per call, while what decides the
result's scale stays in the input's dtype: every ``nn.Linear`` (the head) keeps its weights
and takes its input cast back up, so the target scores are not rounded to ``compute_dtype``
(2**-8 of a score in bfloat16), and the model's output, the input gradients and every
accumulation the methods make over them (IG steps, SmoothGrad samples) are in ``x``'s dtype.

``channels_last`` on CPU: the copy's 4-D weights and the input are channels-last (oneDNN's
faster layout for convolutions and pooling); a model that fails on such a tensor (a
``x.view(n, -1)`` on it) runs channels-first instead, remembered for the copy.

Nested calls share the copy: ``shared_copies()`` (SmoothGrad around its inner method) keeps
each converted model for the block, so a call converts the model once.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from torch import nn

_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cnnviz_shared_copies", default=None)


def check_compute_dtype(compute_dtype) -> torch.dtype | None:
    """None, or a floating ``torch.dtype`` (its name, ``"bfloat16"``, is accepted too)."""
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype, compute_dtype)
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype: expected None or a floating torch.dtype such as torch.bfloat16, "
                        f"got {compute_dtype!r}")
    return compute_dtype


def check_channels_last(channels_last) -> bool | None:
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected None, True or False, got {channels_last!r}")
    return channels_last


@contextlib.contextmanager
def shared_copies():
    """Converted models made inside the block are reused by later calls inside it."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _cast_inputs(dtype):
    def hook(_module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


def _convert(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, layout) -> nn.Module:
    """A copy of ``model``: body in ``dtype``, Linear layers in ``x``'s dtype, 4-D weights in
    ``layout``; parameters frozen. Tensors are converted straight into the copy (deepcopy's
    memo), so the float32 model is not copied first."""
    memo = {}
    for module in model.modules():
        keep = isinstance(module, nn.Linear)
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is None or id(t) in memo:
                continue
            new = t.detach()
            if new.is_floating_point() and not keep:
                new = new.to(dtype)
            if new.dim() == 4:
                new = new.contiguous(memory_format=layout)
            memo[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    low = copy.deepcopy(model, memo)
    for module in low.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(_cast_inputs(x.dtype))
    forward = low.forward
    state = {"layout": layout}

    def converted_forward(inp, *args, **kwargs):
        # the body's dtype and layout going in, the caller's dtype coming out
        while True:
            try:
                out = forward(inp.to(dtype).contiguous(memory_format=state["layout"]), *args, **kwargs)
                break
            except RuntimeError:
                if state["layout"] is torch.contiguous_format:
                    raise
                # channels-last weights would make the outputs channels-last again
                state["layout"] = torch.contiguous_format
                low.to(memory_format=torch.contiguous_format)
        return out.to(inp.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    low.forward = converted_forward
    return low


def lowered(model: nn.Module, x: torch.Tensor, compute_dtype=None, channels_last=None):
    """``(model to run, counterpart)``: ``model`` itself when there is nothing to convert
    (``compute_dtype`` None or ``x``'s dtype, and no channels-last), else the converted copy
    (see the module docstring), shared inside ``shared_copies``. ``counterpart(module)`` maps a
    module of ``model`` to the one that runs. channels_last: None (default) uses it on CPU with
    a lower ``compute_dtype`` (bfloat16 ResNet-50 gradients 1.2-1.3x faster than on
    channels-first copies), not in float32, where ``bench_gradients.py`` measured 1.06-1.15x
    for saliency, guided backprop, IG and SmoothGrad but 0.78x for DeepLIFT's rules (the CAM
    family passes True: ``cam._channels_last``); True / False force it on CPU."""
    dtype = check_compute_dtype(compute_dtype) or x.dtype
    lower = dtype != x.dtype
    use_cl = x.device.type == "cpu" and x.dim() == 4 and (
        lower if check_channels_last(channels_last) is None else channels_last)
    if not lower and not use_cl:
        return model, (lambda module: module)
    layout = torch.channels_last if use_cl else torch.contiguous_format
    shared = _SHARED.get()
    key = (id(model), dtype, x.dtype, layout, x.device)
    if shared is not None and key in shared:
        low = shared[key][1]
    else:
        low = _convert(model, x, dtype, layout)
        if shared is not None:
            shared[key] = (model, low)  # holds model: its id stays unique for the block
    pairs = dict(zip(model.modules(), low.modules()))
    return low, pairs.__getitem__


def fidelity(maps: torch.Tensor, reference: torch.Tensor, top: float = 0.1):
    """How far lower-precision maps stray from the reference maps, per map ``[B, (k,) H, W]``:
    ``(spearman, iou)`` each ``[n_maps]`` float64 numpy, the Spearman rank correlation (ties
    averaged, ``scipy.stats.rankdata``) and the IoU of the ``top`` fraction of pixels by value
    (ties broken by position, ``torch.topk``). For tests and
    benchmarks; scipy comes with scikit-image."""
    import numpy as np
    from scipy.stats import rankdata

    a = maps.detach().double().flatten(0, -3).flatten(1).cpu()
    b = reference.detach().double().flatten(0, -3).flatten(1).cpu()
    ra, rb = rankdata(a.numpy(), axis=1), rankdata(b.numpy(), axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    spearman = np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), 1.0)
    k = max(1, int(round(top * a.shape[1])))
    ta = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, 1).indices, True)
    tb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, 1).indices, True)
    iou = ((ta & tb).sum(1) / (ta | tb).sum(1)).numpy()
    return spearman, iou
