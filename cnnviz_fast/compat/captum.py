"""Captum's attribution classes over cnnviz-fast's engine: change ``from captum.attr import X``
to ``from cnnviz_fast.compat.captum import X`` and nothing else.

Constructors and ``attribute`` keep Captum 0.7-0.9's argument names, defaults and return
conventions: a tensor in gives a tensor out, a tuple of tensors in gives a tuple out, and
``return_convergence_delta=True`` gives ``(attributions, delta)``. Targets take every Captum
form (None for one output per example, an int, a tuple indexing a multi-dimensional output,
a 0-d or ``[B]`` tensor, a list of ints). The numbers are Captum's (the tests compare them at
1e-5 relative); where cnnviz-fast cannot honour an argument the call raises ``ValueError``
naming it, never a silent difference.

How Captum's general calls reach the engine, which takes one ``[B, C, H, W]`` image batch and a
module: a call with a tuple of inputs, inputs that are not 4-D, or tensors among
``additional_forward_args`` runs on ``_Packed``, a small module that takes every input (and
every tensor argument) flattened side by side in one ``[B, N, 1, 1]`` tensor and calls the
forward function on the pieces; the tensor arguments travel inside the rows, so they follow
each row through the engine's repeated and chunked batches (IG's path points, DeepLIFT's
``[inputs; baselines]``), with baselines equal to themselves, so they never move and get no
attribution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import deeplift, grad_cam, guided_backprop, integrated_gradients, layer_activations, lrp, occlusion
from .. import deconvnet, saliency
from .._checks import check_input
from .._hooks import capture, explaining, frozen_parameters
from .._precision import lowered
from .._targets import target_scores
from ..explain.gradients import _GuidedReLU, _replaced_forwards
from ..explain.lrp import Epsilon, Norm, Pass

__all__ = ["Saliency", "InputXGradient", "GuidedBackprop", "Deconvolution", "IntegratedGradients",
           "NoiseTunnel", "DeepLift", "Occlusion", "LayerGradCam", "GuidedGradCam", "LayerActivation", "LRP"]


# ----------------------------------------------------------------------------- inputs and targets

def _as_tuple(name, inputs):
    """Captum's ``_format_tensor_into_tuples``, checked: (tuple of tensors, whether a tuple came in)."""
    is_tuple = isinstance(inputs, tuple)
    items = inputs if is_tuple else (inputs,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{name}: expected a tensor or a tuple of tensors")
    if len({t.shape[0] if t.dim() else None for t in items}) != 1 or items[0].dim() == 0:
        raise ValueError(f"{name}: every tensor needs the same batch size on dimension 0")
    return items, is_tuple


def _as_args(additional_forward_args):
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)


def _output_form(attrs, is_tuple):
    return tuple(attrs) if is_tuple else attrs[0]


class _Packed(nn.Module):
    """``forward_func(*inputs, *additional_forward_args)`` taking its tensors flattened side by
    side in one ``[B, N, 1, 1]`` float tensor (``pack``); non-tensor arguments are constants."""

    def __init__(self, forward_func, inputs, args):
        super().__init__()
        self.forward_func = forward_func
        self.args = args
        tensors = list(inputs) + [a for a in args if isinstance(a, torch.Tensor) and a.dim()]
        self.shapes = [tuple(t.shape[1:]) for t in tensors]
        self.dtypes = [t.dtype for t in tensors]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.n_inputs = len(inputs)
        self.dtype = inputs[0].dtype

    def pack(self, inputs):
        """The inputs followed by the batched tensor arguments: ``[B, N, 1, 1]``."""
        tensors = list(inputs) + [a for a in self.args if isinstance(a, torch.Tensor) and a.dim()]
        return torch.cat([t.reshape(t.shape[0], -1).to(self.dtype) for t in tensors], 1)[..., None, None]

    def unpack(self, packed):
        """The per-input pieces of a packed ``[B, N, ...]`` tensor, in the inputs' shapes."""
        pieces = packed.reshape(packed.shape[0], -1).split(self.sizes, 1)
        return [p.reshape(-1, *s) for p, s in zip(pieces, self.shapes)]

    def forward(self, packed):
        pieces = self.unpack(packed)
        tensors = iter(p.to(d) for p, d in zip(pieces[self.n_inputs:], self.dtypes[self.n_inputs:]))
        args = [next(tensors) if isinstance(a, torch.Tensor) and a.dim() else a for a in self.args]
        return self.forward_func(*pieces[:self.n_inputs], *args)


class _Module(nn.Module):
    """``forward_func(x, *args)`` as a module (the engine takes modules), for one 4-D input
    and arguments that need no per-row handling (non-tensors, 0-d tensors)."""

    def __init__(self, forward_func, args=()):
        super().__init__()
        self.forward_func, self.args = forward_func, args

    def forward(self, x):
        return self.forward_func(x, *self.args)


def _batched(args):
    return any(isinstance(a, torch.Tensor) and a.dim() for a in args)


def _module(forward_func, args):
    """The engine's model for one 4-D input and per-row-free ``args``."""
    return forward_func if isinstance(forward_func, nn.Module) and not args else _Module(forward_func, args)


class _Call:
    """One ``attribute`` call put in the engine's terms: ``model`` and the 4-D ``x`` it takes,
    with ``split`` turning the engine's ``[B, ...]`` result back into Captum's inputs."""

    def __init__(self, forward_func, inputs, additional_forward_args, module_only=False):
        self.inputs, self.is_tuple = _as_tuple("inputs", inputs)
        args = _as_args(additional_forward_args)
        if module_only and not isinstance(forward_func, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(forward_func).__name__}")
        if len(self.inputs) == 1 and self.inputs[0].dim() == 4 and not _batched(args):
            self.packed = None
            self.model = _module(forward_func, args)
            self.x = self.inputs[0]
        else:
            self.packed = self.model = _Packed(forward_func, self.inputs, args)
            self.x = self.packed.pack(self.inputs)

    def baselines(self, baselines):
        """Captum's baselines (None, a number, a tensor, or a tuple of those per input) as one
        tensor of ``x``'s shape."""
        per_input = baselines if isinstance(baselines, tuple) else (baselines,) * len(self.inputs)
        if len(per_input) != len(self.inputs):
            raise ValueError(f"baselines: expected {len(self.inputs)} baselines, one per input, got {len(per_input)}")
        full = []
        for i, (b, x) in enumerate(zip(per_input, self.inputs)):
            if b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)):
                full.append(torch.full_like(x, 0.0 if b is None else float(b)))
            elif isinstance(b, torch.Tensor):
                try:
                    full.append(b.to(x.dtype).expand_as(x))
                except RuntimeError:
                    raise ValueError(f"baselines: baseline {i} of shape {tuple(b.shape)} does not broadcast to "
                                     f"the input's shape {tuple(x.shape)}") from None
            else:
                raise TypeError(f"baselines: expected None, a number or a tensor per input, got {type(b).__name__}")
        if self.packed is None:
            return full[0]
        # tensor arguments ride along in the rows: their baseline is themselves
        return torch.cat([self.packed.pack(full)[:, :sum(self.packed.sizes[:len(self.inputs)])],
                          self.x[:, sum(self.packed.sizes[:len(self.inputs)]):]], 1)

    def split(self, attr):
        """The engine's result ``[B, ...]`` for ``x`` as Captum's output (tensor or tuple)."""
        if self.packed is None:
            return _output_form([attr], self.is_tuple)
        return _output_form(self.packed.unpack(attr)[:len(self.inputs)], self.is_tuple)


def _check_target_size(scores, batch):
    if scores.numel() != batch:
        raise ValueError(f"target: the selected output has shape {tuple(scores.shape)}; Captum's gradient "
                         f"methods need one value per example (pass a target that selects one)")
    return scores.reshape(batch)


class _WholeOutput:
    """``target=None``: the output itself, one value per example."""

    def __call__(self, output):
        return _check_target_size(output, output.shape[0])


class _Index:
    """A tuple target: ``output[:, *index]``, one value per example."""

    def __init__(self, index):
        self.index = index

    def __call__(self, output):
        if len(self.index) > output.dim() - 1:
            raise ValueError(f"target: {self.index} indexes more dimensions than the output's "
                             f"{tuple(output.shape[1:])}")
        return _check_target_size(output[(slice(None), *self.index)], output.shape[0])


def _target(target, batch):
    """Captum's target forms as the engine's: an int, ``[B]`` class indices or a callable."""
    if target is None:
        return _WholeOutput()
    if isinstance(target, bool):
        raise TypeError("target: expected None, an int, a tuple, a tensor or a list, got a bool")
    if isinstance(target, int):
        return target
    if isinstance(target, tuple):
        return _Index(target)
    if isinstance(target, torch.Tensor):
        if target.numel() == 1:
            return int(target.item())
        if target.dim() == 1 and target.numel() == batch:
            return target.long()
        raise ValueError(f"target: a tensor target must hold one value or one per example ({batch}), got "
                         f"shape {tuple(target.shape)}")
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f"target: a list target needs one entry per example ({batch}), got {len(target)}")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            return torch.tensor(target, dtype=torch.long)
        raise ValueError("target: lists of tuples are not supported by cnnviz_fast.compat.captum; pass a "
                         "list of ints, or one tuple shared by every example")
    raise TypeError(f"target: expected None, an int, a tuple, a tensor or a list, got {type(target).__name__}")


def _unsupported(name, value, default, why=""):
    if value is not default and value != default:
        raise ValueError(f"{name}: cnnviz_fast.compat.captum supports only {name}={default!r}{why}")


def _on_device(target, x):
    return target.to(x.device) if isinstance(target, torch.Tensor) else target


# ----------------------------------------------------------------------------- the classes

class _Attribution:
    """Captum's ``Attribution`` interface: ``attribute``, ``has_convergence_delta``,
    ``multiplies_by_inputs``."""
    _has_delta = False
    _multiplies = False

    def __init__(self, forward_func):
        if not callable(forward_func):
            raise TypeError(f"forward_func: expected a callable or an nn.Module, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def has_convergence_delta(self) -> bool:
        return self._has_delta

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiplies

    def _gradient_call(self, method, inputs, target, additional_forward_args, module_only=False, **kw):
        call = _Call(self.forward_func, inputs, additional_forward_args, module_only)
        attr = method(call.model, call.x, _on_device(_target(target, call.x.shape[0]), call.x), **kw)
        return call, attr


class Saliency(_Attribution):
    """Captum ``Saliency`` on ``cnnviz_fast.saliency``: the input gradient of the target, absolute
    by default."""

    def attribute(self, inputs, target=None, abs: bool = True, additional_forward_args=None):
        call, attr = self._gradient_call(saliency, inputs, target, additional_forward_args, abs=abs)
        return call.split(attr)


class InputXGradient(_Attribution):
    """Captum ``InputXGradient``: the input times its gradient (``cnnviz_fast.saliency(abs=False)``)."""
    _multiplies = True

    def attribute(self, inputs, target=None, additional_forward_args=None):
        call, grads = self._gradient_call(saliency, inputs, target, additional_forward_args, abs=False)
        return call.split(grads * call.x)


class GuidedBackprop(_Attribution):
    """Captum ``GuidedBackprop`` on ``cnnviz_fast.guided_backprop`` (``nn.ReLU`` modules)."""
    _rule = staticmethod(guided_backprop)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.model = model

    def attribute(self, inputs, target=None, additional_forward_args=None):
        call, attr = self._gradient_call(self._rule, inputs, target, additional_forward_args, module_only=True)
        return call.split(attr)


class Deconvolution(GuidedBackprop):
    """Captum ``Deconvolution`` on ``cnnviz_fast.deconvnet`` (``nn.ReLU`` modules)."""
    _rule = staticmethod(deconvnet)


class IntegratedGradients(_Attribution):
    """Captum ``IntegratedGradients`` on ``cnnviz_fast.integrated_gradients``; methods
    ``"gausslegendre"`` (Captum's default) and ``"riemann_trapezoid"``."""
    _has_delta = True

    def __init__(self, forward_func, multiply_by_inputs: bool = True):
        super().__init__(forward_func)
        _unsupported("multiply_by_inputs", multiply_by_inputs, True)
        self._multiplies = multiply_by_inputs

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps: int = 50,
                  method: str = "gausslegendre", internal_batch_size=None, return_convergence_delta: bool = False):
        if method not in ("gausslegendre", "riemann_trapezoid"):
            raise ValueError(f"method: cnnviz_fast.compat.captum supports 'gausslegendre' and "
                             f"'riemann_trapezoid', got {method!r}")
        call = _Call(self.forward_func, inputs, additional_forward_args)
        out = integrated_gradients(call.model, call.x, _on_device(_target(target, call.x.shape[0]), call.x),
                                   baseline=call.baselines(baselines), steps=n_steps, method=method,
                                   batch_size=internal_batch_size, return_delta=return_convergence_delta)
        if return_convergence_delta:
            return call.split(out[0]), out[1]
        return call.split(out)


class DeepLift(_Attribution):
    """Captum ``DeepLift`` (rescale rule) on ``cnnviz_fast.deeplift``."""
    _has_delta = True

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True, eps: float = 1e-10):
        super().__init__(model)
        _unsupported("multiply_by_inputs", multiply_by_inputs, True)
        self.model, self.eps, self._multiplies = model, eps, multiply_by_inputs

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None,
                  return_convergence_delta: bool = False, custom_attribution_func=None):
        _unsupported("custom_attribution_func", custom_attribution_func, None)
        call = _Call(self.model, inputs, additional_forward_args, module_only=True)
        out = deeplift(call.model, call.x, _on_device(_target(target, call.x.shape[0]), call.x),
                       baseline=call.baselines(baselines), return_delta=return_convergence_delta, eps=self.eps)
        if return_convergence_delta:
            return call.split(out[0]), out[1]
        return call.split(out)


class NoiseTunnel(_Attribution):
    """Captum ``NoiseTunnel`` over any attribution of this module: ``smoothgrad`` (mean),
    ``smoothgrad_sq`` (mean of squares) and ``vargrad`` (variance) of the attributions of
    ``nt_samples`` noisy copies. The noise is drawn as Captum draws it, per batch of
    ``nt_samples_batch_size`` copies and per input, ``torch.normal(0, stdev)`` over
    ``[B * n, ...]`` (copy ``j`` of example ``b`` at row ``b * n + j``), so one seed gives
    Captum's samples; the noisy copies of a batch go to the inner method in one call."""

    def __init__(self, attribution_method):
        if not isinstance(attribution_method, _Attribution):
            raise TypeError("attribution_method: expected an attribution of cnnviz_fast.compat.captum, got "
                            f"{type(attribution_method).__name__}")
        super().__init__(attribution_method.forward_func)
        self.attribution_method = attribution_method
        self._has_delta = attribution_method.has_convergence_delta()
        self._multiplies = attribution_method.multiplies_by_inputs

    def attribute(self, inputs, nt_type: str = "smoothgrad", nt_samples: int = 5, nt_samples_batch_size=None,
                  stdevs=1.0, draw_baseline_from_distrib: bool = False, **kwargs):
        if nt_type not in ("smoothgrad", "smoothgrad_sq", "vargrad"):
            raise ValueError(f"nt_type: expected 'smoothgrad', 'smoothgrad_sq' or 'vargrad', got {nt_type!r}")
        _unsupported("draw_baseline_from_distrib", draw_baseline_from_distrib, False)
        if isinstance(nt_samples, bool) or not isinstance(nt_samples, int) or nt_samples < 1:
            raise ValueError(f"nt_samples: expected an int >= 1, got {nt_samples!r}")
        items, is_tuple = _as_tuple("inputs", inputs)
        sigmas = stdevs if isinstance(stdevs, tuple) else (stdevs,) * len(items)
        if len(sigmas) != len(items) or not all(isinstance(s, float) for s in sigmas):
            raise ValueError(f"stdevs: expected a float or a tuple of {len(items)} floats, got {stdevs!r}")
        per_batch = nt_samples if nt_samples_batch_size is None else min(nt_samples, nt_samples_batch_size)
        sizes = [per_batch] * (nt_samples // per_batch) + ([nt_samples % per_batch] if nt_samples % per_batch else [])
        want_delta = bool(kwargs.get("return_convergence_delta")) and self._has_delta
        sums = squares = None
        deltas = []
        with torch.no_grad():
            for n in sizes:
                noisy = tuple(x.repeat_interleave(n, 0) + torch.normal(
                    0, torch.tensor(s, device=x.device).repeat((x.shape[0] * n, *x.shape[1:])))
                    for x, s in zip(items, sigmas))
                out = self.attribution_method.attribute(noisy if is_tuple else noisy[0], **_expanded(kwargs, n))
                if want_delta:
                    out, delta = out
                    deltas.append(delta)
                attrs = out if isinstance(out, tuple) else (out,)
                grouped = [a.view(a.shape[0] // n, n, *a.shape[1:]) for a in attrs]
                part, part_sq = [g.sum(1) for g in grouped], [g.pow(2).sum(1) for g in grouped]
                sums = part if sums is None else [s + p for s, p in zip(sums, part)]
                squares = part_sq if squares is None else [s + p for s, p in zip(squares, part_sq)]
        mean = [s * 1 / nt_samples for s in sums]
        mean_sq = [s * 1 / nt_samples for s in squares]
        result = mean if nt_type == "smoothgrad" else mean_sq if nt_type == "smoothgrad_sq" else \
            [q - m * m for m, q in zip(mean, mean_sq)]
        result = _output_form(result, isinstance(out, tuple))
        return (result, torch.cat(deltas)) if want_delta else result


def _expanded(kwargs, n):
    """The inner method's keyword arguments for ``n`` noisy copies per example (Captum's
    ``_expand_partial``: targets, tensor arguments and per-example baselines repeated
    example by example)."""
    out = dict(kwargs)
    target = out.get("target")
    if isinstance(target, list):
        out["target"] = [t for t in target for _ in range(n)]
    elif isinstance(target, torch.Tensor) and target.numel() > 1:
        out["target"] = target.repeat_interleave(n, 0)
    if out.get("additional_forward_args") is not None:
        out["additional_forward_args"] = tuple(
            a.repeat_interleave(n, 0) if isinstance(a, torch.Tensor) and a.dim() else a
            for a in _as_args(out["additional_forward_args"]))
    if "baselines" in out:
        baselines = out["baselines"]
        each = baselines if isinstance(baselines, tuple) else (baselines,)
        each = tuple(b.repeat_interleave(n, 0) if isinstance(b, torch.Tensor) and b.dim() and b.shape[0] > 1 else b
                     for b in each)
        out["baselines"] = each if isinstance(baselines, tuple) else each[0]
    return out


class Occlusion(_Attribution):
    """Captum ``Occlusion`` on ``cnnviz_fast.occlusion`` for image batches ``[B, C, H, W]``:
    ``sliding_window_shapes=(C, h, w)`` and ``strides`` (an int, or ``(C_stride, sh, sw)``)
    with windows over every channel, as Captum's image examples use them; the result has the
    input's shape (each pixel's value repeated over the channels, as Captum's). Numbers are
    Captum's; the sweep runs cnnviz's batched kernels, with as many occluded copies per
    forward pass as fit the engine's memory budget (``perturbations_per_eval`` is Captum's
    knob for the same trade, and changes no number; copies of different examples share a
    pass). ``mode`` (cnnviz only, keyword): ``"incremental"`` (default: Krypton's incremental
    inference, only each window's projective field recomputed from the clean activations; the
    same map to float32 rounding, 4.4e-5 of its largest value on ResNet-50 at 224 px against
    Captum, where the batched full sweep differs by 3.3e-5; a model that ``torch.fx`` cannot
    trace falls back to the full sweep with a warning) or ``"exact"`` (the batched full
    sweep), see ``cnnviz_fast.occlusion``."""

    def __init__(self, forward_func, *, mode: str = "incremental"):
        super().__init__(forward_func)
        if mode not in ("exact", "incremental"):
            raise ValueError(f"mode: expected 'exact' or 'incremental', got {mode!r}")
        self.mode = mode

    def attribute(self, inputs, sliding_window_shapes, strides=None, baselines=None, target=None,
                  additional_forward_args=None, perturbations_per_eval: int = 1, show_progress: bool = False):
        items, is_tuple = _as_tuple("inputs", inputs)
        if len(items) != 1 or items[0].dim() != 4:
            raise ValueError("inputs: cnnviz_fast.compat.captum.Occlusion takes one image batch [B, C, H, W]")
        if isinstance(perturbations_per_eval, bool) or not isinstance(perturbations_per_eval, int) \
                or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval: expected an int >= 1, got {perturbations_per_eval!r}")
        x = items[0]
        window = _one(sliding_window_shapes, is_tuple)
        stride = 1 if strides is None else _one(strides, is_tuple)
        if not (isinstance(window, tuple) and len(window) == 3):
            raise ValueError(f"sliding_window_shapes: expected (C, h, w) for [B, C, H, W] inputs, got {window!r}")
        if window[0] != x.shape[1]:
            raise ValueError(f"sliding_window_shapes: cnnviz occludes every channel at once; expected "
                             f"{x.shape[1]} channels in the window, got {window[0]}")
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        if len(stride) != 3:
            raise ValueError(f"strides: expected an int or (C_stride, sh, sw), got {strides!r}")
        args = _as_args(additional_forward_args)
        if _batched(args):
            raise ValueError("additional_forward_args: Occlusion here batches copies of different examples "
                             "together, so batched tensor arguments are not supported")
        base = baselines[0] if is_tuple and isinstance(baselines, tuple) else baselines
        model = _module(self.forward_func, args)
        base = 0.0 if base is None else base
        if isinstance(base, torch.Tensor) and base.dim() == 4 and base.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"baselines: expected a batch of 1 or {x.shape[0]}, got shape {tuple(base.shape)}")
        maps = occlusion(model, x, _on_device(_target(target, x.shape[0]), x), window=window[1:],
                         stride=stride[1:], baseline=base, mode=self.mode)
        return _output_form([maps[:, None].expand_as(x).contiguous()], is_tuple)


def _one(value, is_tuple):
    """The single input's window or stride: Captum takes a tuple of them for tuple inputs."""
    if is_tuple and isinstance(value, tuple) and len(value) == 1 and not isinstance(value[0], int):
        return value[0]
    return value


def _layer_module(layer):
    if isinstance(layer, (list, tuple)):
        raise ValueError("layer: cnnviz_fast.compat.captum takes one layer (a module)")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer: expected an nn.Module, got {type(layer).__name__}")
    return layer


class LayerGradCam(_Attribution):
    """Captum ``LayerGradCam`` on ``cnnviz_fast.grad_cam``: ``[B, 1, h, w]`` at the layer's
    resolution, ``sum_c mean(dY/dA_c) A_c``, ReLU with ``relu_attributions=True``."""

    def __init__(self, forward_func, layer, device_ids=None):
        super().__init__(forward_func)
        _unsupported("device_ids", device_ids, None, " (DataParallel)")
        self.layer = _layer_module(layer)
        self.device_ids = device_ids

    def attribute(self, inputs, target=None, additional_forward_args=None, attribute_to_layer_input: bool = False,
                  relu_attributions: bool = False, attr_dim_summation: bool = True, grad_kwargs=None):
        _unsupported("attribute_to_layer_input", attribute_to_layer_input, False)
        _unsupported("attr_dim_summation", attr_dim_summation, True)
        _unsupported("grad_kwargs", grad_kwargs, None)
        call = _Call(self.forward_func, inputs, additional_forward_args)
        maps = grad_cam(call.model, call.x, _on_device(_target(target, call.x.shape[0]), call.x), self.layer,
                        relu=relu_attributions, normalize=False, size=None)
        return maps[:, None]


def _guided_with_cam(model, x, target, layer):
    """Guided backprop's input gradients ``[B, C, H, W]`` and, from the same forward and backward
    pass, the layer's Grad-CAM ``[B, 1, h, w]`` (ReLU applied, Captum's ``LayerGradCam``
    numbers); the CAM is None where an ``nn.ReLU`` module runs after the layer, as its guided
    backward would then change the layer's gradient, which Captum's Grad-CAM takes plain."""
    runs, counterpart = lowered(model, x, keep=(layer,))
    module = counterpart(layer)
    seen = {"layer": False, "relu_after": False}

    def layer_done(*_):
        seen["layer"] = True

    def relu_ran(*_):
        seen["relu_after"] |= seen["layer"]

    handles = [module.register_forward_hook(layer_done)]
    handles += [m.register_forward_hook(relu_ran) for m in runs.modules() if type(m) is nn.ReLU]
    try:
        with _replaced_forwards(runs, (nn.ReLU,), lambda _name, m: lambda inp: _GuidedReLU.apply(inp, m.inplace)), \
                capture(runs, module, detach=False) as record, frozen_parameters(runs), torch.enable_grad():
            inputs = x.detach().requires_grad_(True)
            scores = target_scores(runs(inputs), target)
            guided, grads = torch.autograd.grad(scores.sum(), (inputs, record[module]), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if seen["relu_after"] or grads is None:
        return guided, None
    acts = record[module].detach()
    weights = grads.mean(tuple(range(2, grads.dim())), keepdim=True)
    return guided, F.relu((weights * acts).sum(1, keepdim=True))


class GuidedGradCam(_Attribution):
    """Captum ``GuidedGradCam``: guided backprop times the layer's Grad-CAM (ReLU) resized to
    the input with ``interpolate_mode`` (``F.interpolate``, as Captum). Where no ``nn.ReLU``
    module runs after the layer (ResNet's last block, a GAP + linear head), both come from one
    forward and backward pass, the guided gradient at the layer being the plain one there;
    otherwise Grad-CAM takes a pass of its own, as in Captum."""

    def __init__(self, model: nn.Module, layer, device_ids=None):
        super().__init__(model)
        _unsupported("device_ids", device_ids, None, " (DataParallel)")
        self.model, self.layer = model, _layer_module(layer)

    def attribute(self, inputs, target=None, additional_forward_args=None, interpolate_mode: str = "nearest",
                  attribute_to_layer_input: bool = False):
        _unsupported("attribute_to_layer_input", attribute_to_layer_input, False)
        items, is_tuple = _as_tuple("inputs", inputs)
        if len(items) != 1 or items[0].dim() != 4:
            raise ValueError("inputs: cnnviz_fast.compat.captum.GuidedGradCam takes one image batch [B, C, H, W]")
        call = _Call(self.model, inputs, additional_forward_args, module_only=True)
        engine_target = _on_device(_target(target, call.x.shape[0]), call.x)
        check_input(call.model, call.x)
        with explaining(call.model, call.x):
            guided, cam = _guided_with_cam(call.model, call.x, engine_target, self.layer)
        if cam is None:
            cam = grad_cam(call.model, call.x, engine_target, self.layer, relu=True, normalize=False, size=None)[:, None]
        cam = F.interpolate(cam, size=tuple(items[0].shape[2:]), mode=interpolate_mode)
        return call.split(guided * cam)


class LayerActivation(_Attribution):
    """Captum ``LayerActivation`` on ``cnnviz_fast.layer_activations``: the layer's output, the
    forward pass stopped right after the layer."""

    def __init__(self, forward_func, layer, device_ids=None):
        super().__init__(forward_func)
        _unsupported("device_ids", device_ids, None, " (DataParallel)")
        self.layer = _layer_module(layer)

    def attribute(self, inputs, additional_forward_args=None, attribute_to_layer_input: bool = False):
        _unsupported("attribute_to_layer_input", attribute_to_layer_input, False)
        call = _Call(self.forward_func, inputs, additional_forward_args)
        return layer_activations(call.model, call.x, self.layer)


# Captum's default LRP rules (captum/attr/_core/lrp.py SUPPORTED_LAYERS_WITH_RULES): epsilon 1e-9
# on convolutions, linear and pooling layers (on max pooling it routes relevance to the winner,
# as the plain gradient does); ReLU, Dropout and Tanh pass relevance.
_LRP_EPSILON = 1e-9
_LRP_RULES = {nn.Conv2d: Epsilon(_LRP_EPSILON), nn.Linear: Epsilon(_LRP_EPSILON),
              nn.AvgPool2d: Norm(_LRP_EPSILON), nn.AdaptiveAvgPool2d: Norm(_LRP_EPSILON),
              nn.ReLU: Pass(), nn.Dropout: Pass(), nn.Tanh: Pass()}
_LRP_ROUTED = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten)


class LRP(_Attribution):
    """Captum ``LRP`` with its default rules on ``cnnviz_fast.lrp``: LRP-epsilon (1e-9) on
    ``Conv2d``, ``Linear``, average and max pooling, pass-through on ``ReLU``, ``Dropout``,
    ``Tanh``. Captum's epsilon rule on ``BatchNorm2d`` and rules set on modules (``module.rule``)
    are not covered: such models raise ``ValueError``."""
    _has_delta = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.model = model

    def attribute(self, inputs, target=None, additional_forward_args=None, return_convergence_delta: bool = False,
                  verbose: bool = False):
        for name, module in self.model.named_modules():
            rule = getattr(module, "rule", None)
            if rule is not None and not (type(rule).__name__ == "EpsilonRule"
                                         and getattr(rule, "STABILITY_FACTOR", None) == _LRP_EPSILON):
                raise ValueError(f"model: layer {name!r} carries a Captum rule (module.rule); cnnviz_fast.compat."
                                 f"captum.LRP applies Captum's default rules only")
            leaf = next(module.children(), None) is None
            if leaf and type(module) not in (*_LRP_RULES, *_LRP_ROUTED):
                raise ValueError(f"model: layer {name!r} ({type(module).__name__}) has no default rule in Captum's "
                                 f"LRP that cnnviz_fast.compat.captum covers")
        call = _Call(self.model, inputs, additional_forward_args, module_only=True)
        engine_target = _on_device(_target(target, call.x.shape[0]), call.x)
        attr = lrp(call.model, call.x, engine_target, rules=_LRP_RULES, canonize=False)
        if not return_convergence_delta:
            return call.split(attr)
        with torch.no_grad():
            scores = target_scores(call.model(call.x), engine_target)
        return call.split(attr), scores - attr.flatten(1).sum(1)   # Captum's LRP sign: output - sum
