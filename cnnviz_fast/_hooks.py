"""Model plumbing every method uses: layers by name, activation capture, layer gradients.

Hooks are always removed, also when the forward pass raises, and the model is left as found
(``requires_grad`` flags restored, no ``.grad`` filled). Every public method runs inside
``explaining``: a model in training mode is explained in eval mode and its modes restored.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import warnings

import torch
from torch import nn

from ._checks import check_input, check_model
from ._targets import method_target, predicted_classes, target_scores

# Layers whose training-mode output is random or depends on the batch (and whose running
# statistics a training-mode pass updates): the switch to eval changes their results.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)
_TRAIN_MODE_WARNING = ("model: is in training mode; cnnviz_fast explains it in eval mode (no dropout, "
                       "batch norm with its running statistics, which stay untouched) and restores its "
                       "mode afterwards. Call model.eval() to silence this warning.")


@contextlib.contextmanager
def explaining(model: nn.Module, x: torch.Tensor | None = None, name: str = "x"):
    """The block every public method runs in, so the model is never changed:

    - eval mode: the model is switched to eval for the block and every module's own mode is
      restored afterwards, also on errors. Dropout and batch-norm statistics updates would
      otherwise make maps random, batch-dependent, and change the model's buffers. Where that
      matters (a dropout or batch/instance-norm layer in training mode) a warning says so, once
      per process.
    - the model's own error on its first forward pass of ``x`` (a ``RuntimeError`` raised
      before that pass returned) is re-raised as ``ValueError("x: the model rejected shape
      ...")`` keeping the original message, so a wrong input is named as such.
    """
    check_model(model)
    modes = [(m, m.training) for m in model.modules()]
    if any(flag and isinstance(m, _MODE_DEPENDENT) for m, flag in modes):
        warnings.warn(_TRAIN_MODE_WARNING, UserWarning, stacklevel=1)  # one location: shown once
    state = {"done": False}

    def finished(_module, _inputs, _output):
        state["done"] = True

    finished.cnnviz_internal = True  # not the user's: converted copies (_precision) leave it out
    handle = model.register_forward_hook(finished) if x is not None else None
    try:
        for m, _ in modes:  # eval() by its flags: some modules (torch.export's) refuse a call to eval()
            m.training = False
        yield
    except RuntimeError as err:
        if x is None or state["done"] or isinstance(err, torch.OutOfMemoryError):
            raise
        raise ValueError(f"{name}: the model rejected shape {tuple(x.shape)} ({x.dtype}): {err}") from err
    finally:
        if handle is not None:
            handle.remove()
        for m, flag in modes:
            m.training = flag


def explanation(fn=None, *, ndim=4, target: bool = True):
    """Decorator of the public methods ``fn(model, x, target, ...)`` (``target=False``:
    ``fn(model, x, ...)``): checks ``x`` against the model (``_checks.check_input``), runs
    ``fn`` inside ``explaining``, and turns class names and ``None`` (the predicted class, from
    one forward pass of ``x``) into class indices."""
    if fn is None:
        return functools.partial(explanation, ndim=ndim, target=target)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        model, x = bound.arguments["model"], bound.arguments["x"]
        check_input(model, x, ndim=ndim)
        with explaining(model, x):
            if target:
                wanted = method_target(model, bound.arguments.get("target"), x.shape[0], x.device)
                if wanted is None:
                    with torch.no_grad():
                        wanted = predicted_classes(model(x))
                bound.arguments["target"] = wanted
            return fn(*bound.args, **bound.kwargs)
    return wrapper


def resolve_layer(model: nn.Module, layer) -> nn.Module:
    """The submodule ``layer`` names: a dotted name (``"layer4.1.conv2"``) or a module of
    ``model``. An unknown name raises ``ValueError`` listing the closest names."""
    check_model(model)
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer: the module {type(layer).__name__} is not part of the model")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer: expected a module or a dotted name, got {type(layer).__name__}")
    names = dict(model.named_modules())
    if layer not in names or layer == "":
        close = difflib.get_close_matches(layer, [n for n in names if n], n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"layer: no module named {layer!r} in {type(model).__name__}{hint}")
    return names[layer]


def layer_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("layer: the module is not part of the model")


def _has_inplace(model: nn.Module) -> bool:
    return any(getattr(m, "inplace", False) for m in model.modules())


@contextlib.contextmanager
def capture(model: nn.Module, layers, detach: bool = True, grad_leaf: bool = False):
    """Record the outputs of ``layers`` (names or modules) during forward passes.

    Yields a dict ``{layer: tensor}`` keyed as given, filled on each forward pass.
    ``grad_leaf=True`` cuts the graph at each layer: its output becomes a leaf that
    requires grad, so gradients stop there and never reach earlier layers or parameters.
    With in-place modules in the model (``ReLU(inplace=True)``) the captured tensor is kept
    and a copy flows on, so the record is the layer's true output and its gradient is the
    gradient of that output (Captum issue 156 gets both wrong).
    """
    keys = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    modules = [resolve_layer(model, k) for k in keys]
    copy_on = _has_inplace(model)
    record = {}

    def make_hook(key):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {key!r}: output is a {type(output).__name__}, expected a tensor")
            if grad_leaf:
                output = output.detach().requires_grad_(True)
            record[key] = output.detach() if detach and not grad_leaf else output
            return output.clone() if copy_on else output
        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, m in zip(keys, modules)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def layout_probe(model: nn.Module, x: torch.Tensor):
    """``model(x)`` without gradients, in the layout the model runs fastest in, counting the
    bytes of every leaf module's output (an upper bound of the pass's activations, which sizes
    chunks of copies). Channels-last on CPU, where oneDNN's convolutions and pooling are faster
    on it (VGG16 1.4x); a model that fails on it (``x.view(n, -1)``) runs channels-first.
    Returns ``(output, activation bytes, layout)``."""
    total = [0]

    def count(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules() if next(m.children(), None) is None]
    layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    try:
        with torch.no_grad():
            try:
                output = model(x.contiguous(memory_format=layout))
            except RuntimeError:
                if layout == torch.contiguous_format:
                    raise
                layout, total[0] = torch.contiguous_format, 0
                output = model(x)
    finally:
        for h in handles:
            h.remove()
    return output, total[0], layout


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Switch parameter gradients off for the block, restoring every flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def layer_gradients(model: nn.Module, x: torch.Tensor, layer, target):
    """Activations of ``layer`` and the gradients of the target scores with respect to them.

    One forward pass; the backward pass runs from the scores to the layer only
    (``torch.autograd.grad``, parameters frozen, no ``.grad`` filled). Returns
    ``(activations [B, ...], gradients, output)`` where gradients is ``[B, ...]`` for an int,
    per-sample or callable target and ``[B, k, ...]`` for a ``[B, k]`` target (one batched
    vector-Jacobian product, ``is_grads_batched``, so the forward pass runs once).
    """
    with frozen_parameters(model), capture(model, layer, grad_leaf=True) as record:
        with torch.enable_grad():
            output = model(x)
            acts = record[layer]
            grads = score_gradients(target_scores(output, target), acts)
    return acts.detach(), grads, output.detach()


def score_gradients(scores: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Gradients of ``scores`` (``[B]`` or ``[B, k]``, computed from ``acts``) with respect to
    ``acts``: ``[B, ...]``, or ``[B, k, ...]`` from one batched vector-Jacobian product. Raises
    ``ValueError`` when the scores do not depend on ``acts`` (a layer off the output's path)."""
    if not scores.requires_grad:
        grads = None
    elif scores.dim() == 1:
        (grads,) = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
    else:
        k = scores.shape[1]
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        basis = eye[:, None, :].expand(k, scores.shape[0], k)
        (grads,) = torch.autograd.grad(scores, acts, grad_outputs=basis, is_grads_batched=True,
                                       allow_unused=True)
        grads = None if grads is None else grads.movedim(0, 1)
    if grads is None:
        raise ValueError("layer: the target scores do not depend on this layer's output; choose a "
                         "layer on the path from the input to the output")
    return grads
