"""Mixed precision, channels-last and folded batch norms for the explanation methods: one
converted copy of the model, the user's model untouched.

``compute_dtype`` (e.g. ``torch.bfloat16``) runs the *body* of the network in that precision
on a copy whose parameters and buffers are converted once per call, while what decides the
result's scale stays in the input's dtype: every ``nn.Linear`` (the head) keeps its weights
and takes its input cast back up, so the target scores are not rounded to ``compute_dtype``
(2**-8 of a score in bfloat16), and the model's output, the input gradients and every
accumulation the methods make over them (IG steps, SmoothGrad samples) are in ``x``'s dtype.

``channels_last`` on CPU: the copy's 4-D weights and the input are channels-last (oneDNN's
faster layout for convolutions and pooling); a model that fails on such a tensor (a
``x.view(n, -1)`` on it) runs channels-first instead, remembered for the copy.

Batch norm folded into its convolution: in the copy, an eval-mode ``BatchNorm2d`` that takes
the output of a ``Conv2d`` used by nothing else (read from a ``torch.fx`` trace of the model,
or from adjacent children of an ``nn.Sequential`` where the model does not trace) is applied
to that convolution's weight and bias once (``W * g / sqrt(v + eps)``, computed in float64),
and the batch norm passes its input through. The same function to float32 rounding; it saves
one memory-bound pass per batch norm forward and backward (ResNet-50 forward+backward 1.17x on
channels-last copies, the default model's forward 1.35x). Pairs are left as they are when the
convolution's own output is read (``keep``: a CAM layer, a hooked module) or either module
carries hooks of the user's.

Calls share the copy: the last converted copy of each model is kept with it and reused while
nothing of the model changed (SmoothGrad's inner calls, a dataset explained batch by batch).
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn


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


def _cast_inputs(dtype):
    def hook(_module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` for every ``BatchNorm2d`` fed by a ``Conv2d`` whose
    output nothing else reads, from a ``torch.fx`` trace of the model (cached per model while
    its modules stay the same), else from adjacent children of each ``nn.Sequential``."""
    signature = tuple(map(id, model.modules()))
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
        modules = dict(model.named_modules())
        pairs = [(node.args[0].target, node.target) for node in graph.nodes
                 if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d)
                 and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module"
                 and isinstance(modules.get(node.args[0].target), nn.Conv2d) and len(node.args[0].users) == 1]
    except Exception:  # noqa: BLE001 - models with data-dependent control flow do not trace
        pairs = [(f"{prefix}{prefix and '.'}{a}", f"{prefix}{prefix and '.'}{b}")
                 for prefix, seq in model.named_modules() if isinstance(seq, nn.Sequential)
                 for (a, conv), (b, bn) in zip(seq.named_children(), list(seq.named_children())[1:])
                 if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)]
    _PLANS[model] = (signature, pairs)
    return pairs


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _user_hooks(module: nn.Module) -> tuple:
    """Handles of the module's hooks, without the ones cnnviz's own blocks put on the model."""
    return tuple(key for name in _HOOK_DICTS for key, hook in getattr(module, name).items()
                 if not getattr(hook, "cnnviz_internal", False))


def _has_hooks(module: nn.Module) -> bool:
    return bool(_user_hooks(module))


def _foldable(model: nn.Module, keep) -> list[tuple[str, str]]:
    """The pairs of ``_conv_bn_pairs`` whose fold changes nothing a caller reads."""
    modules = dict(model.named_modules())
    keep = set(map(id, keep))
    return [(c, b) for c, b in _conv_bn_pairs(model)
            if id(modules[c]) not in keep and not modules[b].training and modules[b].running_var is not None
            and not _has_hooks(modules[c]) and not _has_hooks(modules[b])]


def _pass_through(x):
    return x


def _fold(copy_modules: dict, pairs, dtype, layout) -> None:
    """Fold each batch norm into its convolution, in the copy, in float64 then ``dtype``."""
    for conv_name, bn_name in pairs:
        conv, bn = copy_modules[conv_name], copy_modules[bn_name]
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = -bn.running_mean.double() * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight = nn.Parameter(weight.to(dtype).contiguous(memory_format=layout), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        bn.forward = _pass_through


def _convert(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, layout, fold=()) -> nn.Module:
    """A copy of ``model``: body in ``dtype``, Linear layers in ``x``'s dtype, 4-D weights in
    ``layout``, the ``fold`` pairs folded; parameters frozen. Tensors are converted straight
    into the copy (deepcopy's memo), so the float32 model is not copied first."""
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
        for name in _HOOK_DICTS:
            for key in [k for k, hook in getattr(module, name).items() if getattr(hook, "cnnviz_internal", False)]:
                del getattr(module, name)[key]
    _fold(dict(low.named_modules()), fold, dtype, layout)
    for module in low.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(_cast_inputs(x.dtype))
    forward = low.forward
    state = {"layout": layout}

    def converted_forward(inp, *args, **kwargs):
        # the body's dtype and layout going in, the caller's dtype coming out
        try:
            out = forward(inp.to(dtype).contiguous(memory_format=state["layout"]), *args, **kwargs)
        except RuntimeError:
            if state["layout"] is torch.contiguous_format:
                raise
            # channels-last weights would make the outputs channels-last again
            low.to(memory_format=torch.contiguous_format)
            try:
                out = forward(inp.to(dtype), *args, **kwargs)
            except RuntimeError:
                low.to(memory_format=torch.channels_last)  # the input was at fault, not the layout
                raise
            state["layout"] = torch.contiguous_format
        return out.to(inp.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    low.forward = converted_forward
    return low


def _state(model: nn.Module) -> tuple:
    """What a converted copy depends on: every module, its mode and hooks, every tensor's
    identity, storage and in-place version (an optimizer step or ``load_state_dict`` changes it)."""
    modules = tuple((id(m), m.training, _user_hooks(m)) for m in model.modules())
    tensors = tuple((id(t), t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    return modules, tensors


# model -> (key, state, copy): the last converted copy of each model, reused while the model is
# as it was (converting ResNet-50 costs 70 ms, a tenth of one saliency batch); dies with the model
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lowered(model: nn.Module, x: torch.Tensor, compute_dtype=None, channels_last=None, *, keep=(), fold=True):
    """``(model to run, counterpart)``: ``model`` itself when there is nothing to convert
    (``compute_dtype`` None or ``x``'s dtype, no channels-last, no batch norm to fold), else the
    converted copy (see the module docstring). ``counterpart(module)`` maps a module of
    ``model`` to the one that runs. The last copy of each model is kept (weakly, with the
    model) and reused while the model's modules, modes, hooks and tensors are unchanged.
    channels_last: None (default) and True: on CPU, channels-last and folded batch norms (results
    equal to the model's own to float32 rounding); False: the model's own layout and modules,
    rounding as the peers do (the copy only for a lower ``compute_dtype``).
    keep: modules whose own output the caller reads (a CAM layer): their batch norm stays.
    fold: False keeps every batch norm (LRP folds them by its own rules)."""
    dtype = check_compute_dtype(compute_dtype) or x.dtype
    lower = dtype != x.dtype
    optimized = x.device.type == "cpu" and check_channels_last(channels_last) is not False
    use_cl = optimized and x.dim() == 4
    pairs = tuple(_foldable(model, keep)) if fold and optimized else ()
    if not lower and not use_cl and not pairs:
        return model, (lambda module: module)
    layout = torch.channels_last if use_cl else torch.contiguous_format
    key = (dtype, x.dtype, layout, x.device, pairs)
    state = _state(model)
    cached = _COPIES.get(model)
    if cached is not None and cached[:2] == (key, state):
        low = cached[2]
    else:
        low = _convert(model, x, dtype, layout, pairs)
        _COPIES[model] = (key, state, low)
    mapping = dict(zip(model.modules(), low.modules()))
    return low, mapping.__getitem__


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
