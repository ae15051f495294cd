"""Exact incremental inference for occlusion: Krypton (Nakandala, Kumar, Papakonstantinou,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
SIGMOD 2019), rebuilt on torch.fx.

An occluding patch changes only its projective field in each layer. The model is traced with
``torch.fx``; the clean image runs once and every node's output is kept. For a batch of
patches each node then carries, per patch, only its updated region (a box of the map, one
common size per batch, a per-patch offset), and the outputs equal ``model(occluded copies)``
to float32 rounding:

* Conv2d (stride, padding, dilation, groups; zero padding), MaxPool2d, AvgPool2d: the output
  box is the projective field of the input box, clipped to the map; the input window it needs
  (with its halo) is gathered from the clean activation overlaid with the updated region
  (``ops.incremental_gather``, fill 0 or -inf where the halo leaves the map, which is exactly
  the layer's padding), and the ordinary layer runs on it without padding, batched.
* BatchNorm2d (eval), elementwise activations (in-place ones included), Dropout (eval) and
  elementwise arithmetic, residual add, channel concatenation: on the union of their inputs'
  boxes.
* Anything else (flatten, linear, adaptive pooling, ...) and any node whose box covers more
  than ``FULL_FRACTION`` of its map runs on full maps (regions overlaid on the clean maps),
  and so does everything downstream of it.

Batches: patches whose boxes have the same sizes run together; a batch pads its patches to
common box sizes only while that costs less than running them apart. The head (the nodes
after the last spatial one: flatten, linear, global pooling) runs on the stacked body outputs
of many batches, so its weights are read once per chunk of patches.

Layout: on CPU the image, the clean maps and the regions are channels-last (oneDNN's
convolutions are 5-15% faster on them and its max pooling about 15x); layers the engine does
not run itself get channels-first tensors, as a model expects.

Approximate mode (``tau``): Krypton's projective-field thresholding. Each box side is capped
at ``ceil(tau * map side)``, the box kept centred on the uncapped one; values outside it are
taken from the clean image's activations. ``compute_dtype``: mixed precision, the body in a
lower precision and the head in the image's (see ``_Engine._lower_body``).
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._checks import check_same_device, check_tensor, pair
from ..ops import incremental_gather

# A node whose region covers more than this fraction of its map switches to full maps (as do
# all nodes after it): beyond it, gathers and halos cost more than the spared arithmetic.
FULL_FRACTION = 0.5
# Memory for one batch's full maps when batch_size is None (three live maps of the largest size).
_BATCH_BUDGET_BYTES = 2 << 30
_MAX_BATCH = 64
# On CPU, batches past 16 patches gain no throughput and pad more.
_MAX_BATCH_CPU = 16
# A batch runs every node on one common box size, so a patch joins the current batch only
# while that adds less padding than a batch of its own would cost in per-node overhead, in
# MACs per node of the graph. CPU: fitted on 224-px vgg16 and resnet18 sweeps (1 thread),
# where 16 border windows ran at 10.1 ms each on resnet18 with 1e6 and 8.3 ms with 1e7.
# CUDA: launch latency (~10 us) at tens of TMAC/s, an estimate not yet measured.
_NODE_OVERHEAD_MACS = {"cpu": 1e7, "cuda": 1e9}
# Inputs of the head (see _Engine.head) gathered from several batches before it runs.
_HEAD_CHUNK_BYTES = 64 << 20

_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish}
_POINTWISE_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clamp", "clamp_min", "contiguous",
                      "to"}

_CONST, _INPUT, _WINDOW, _POINTWISE, _CAT, _OTHER, _OUTPUT = range(7)
_ANY_LAYOUT_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                       *_POINTWISE_MODULES)


def _channels_first(v):
    if isinstance(v, torch.Tensor) and v.dim() == 4 and not v.is_contiguous() and \
            v.is_contiguous(memory_format=torch.channels_last):
        return v.contiguous()
    return v


class UnsupportedModel(Exception):
    """``torch.fx`` could not trace the model. ``layer``: the dotted name of the innermost
    module whose forward failed, or the model's class name when its own forward did."""

    def __init__(self, layer: str, cause: Exception):
        super().__init__(f"incremental inference cannot trace the model at layer {layer!r}: "
                         f"{type(cause).__name__}: {cause}")
        self.layer = layer


class _Tracer(fx.Tracer):
    """Records the innermost module being traced when tracing fails."""

    def __init__(self):
        super().__init__()
        self.failed_at = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def _trace(model: nn.Module) -> fx.Graph:
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as err:
        raise UnsupportedModel(tracer.failed_at or type(model).__name__, err) from err


@dataclass
class _Window:
    """A sliding-window layer along both axes, run on gathered windows without padding."""
    kernel: tuple
    stride: tuple
    pad: tuple        # padding before the first row/column
    dilation: tuple
    fill: float       # the padding value (0 for conv and avg pooling, -inf for max pooling)
    run: object       # callable: gathered [P, C, th, tw] -> [P, C', rh, rw]


def _converted(cache: dict, source, key, make):
    """``make(source)`` once per ``cache`` (one occlusion call: its engines share the copies,
    which go with the call)."""
    entry = cache.get((id(source), key))
    if entry is None:
        entry = cache[id(source), key] = (source, make(source))  # holds source: its id stays unique
    return entry[1]


def _conv_weight(cache: dict, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A conv weight for input ``x``: on channels-last inputs ATen copies a channels-first
    weight at every call (5% of a VGG16 map in bfloat16), so one copy per call instead."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return _converted(cache, weight, torch.channels_last,
                          lambda w: w.detach().contiguous(memory_format=torch.channels_last))
    return weight


def _window_of(m: nn.Module, cache: dict):
    """The _Window of a supported Conv2d/MaxPool2d/AvgPool2d, else None."""
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
        k, s, d = m.kernel_size, m.stride, m.dilation
        pad = m.padding if not isinstance(m.padding, str) else \
            (0, 0) if m.padding == "valid" else tuple(d[i] * (k[i] - 1) // 2 for i in range(2))

        return _Window(k, s, pad, d, 0.0, lambda x: F.conv2d(x, _conv_weight(cache, m.weight, x), m.bias, s, 0, d,
                                                               m.groups))
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        k, s, p, d = (pair("kernel_size", m.kernel_size), pair("stride", m.stride or m.kernel_size),
                      pair("padding", m.padding, 0), pair("dilation", m.dilation))
        # ceil_mode needs nothing more: the output size comes from the clean pass and windows
        # past the map read the -inf fill.
        return _Window(k, s, p, d, float("-inf"), lambda x: F.max_pool2d(x, k, s, 0, d))
    if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and (m.count_include_pad or not any(pair("padding", m.padding, 0))):
        k, s, p = pair("kernel_size", m.kernel_size), pair("stride", m.stride or m.kernel_size), pair("padding", m.padding, 0)
        return _Window(k, s, p, (1, 1), 0.0,
                       lambda x: F.avg_pool2d(x, k, s, 0, divisor_override=m.divisor_override))
    return None


def _macs(m, out) -> int:
    """Multiply-accumulates of a Conv2d or Linear producing ``out`` (batch 1), else 0."""
    if isinstance(m, nn.Conv2d):
        return out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return 0


@dataclass
class _Region:
    """One node's updated values for a batch: ``values [P, C, rh, rw]`` at ``offsets [P, 2]``."""
    values: torch.Tensor
    offsets: torch.Tensor


@dataclass
class _Plan:
    """Per patch (over all positions) and node: the updated box and whether it runs full."""
    boxes: dict       # node -> int64 [N, 4] (y0, y1, x0, x1), half-open; spatial nodes only
    full: dict        # node -> bool [N]
    cost: np.ndarray  # [N] conv/linear MACs of each patch, as the engine computes them
    fallback: str | None  # the first unsupported layer that forces full maps on some patch


class _Engine:
    """A traced model, its clean activations for one image, and the incremental passes."""

    def __init__(self, model: nn.Module, image: torch.Tensor, tau=None, compute_dtype=None, cache=None):
        self.model = model
        self.tau = tau
        # converted weights and modules (channels-last, compute_dtype), shared by the engines of a call
        self.cache = {} if cache is None else cache
        self.graph = _trace(model)
        self.nodes = list(self.graph.nodes)
        self.modules = dict(model.named_modules())
        # Mixed precision (see _lower_body): set once the head is known.
        self.dtype, self.compute_dtype = image.dtype, None
        self.lowered, self.head_weights, self.head_clean = {}, {}, {}
        self.window = {}  # node -> _Window, filled by _classify
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        self.input = inputs[0]
        dependent = {self.input}
        self._clean_pass(image, head=len(self.nodes))
        for n in self.nodes:
            if n.op not in ("placeholder", "output") and any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        self.kind, self.macs, self.identity = {}, {}, set()
        for n in self.nodes:
            self.kind[n] = _OUTPUT if n.op == "output" else _INPUT if n is self.input else \
                _CONST if n not in dependent else self._classify(n)
            m = self.modules.get(n.target) if n.op == "call_module" else None
            self.macs[n] = _macs(m, self.clean[n]) if n in dependent and m is not None else 0
        self.last_use = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        # The head: the nodes from which on no node is spatial (flatten, linear, global pooling).
        # It runs on many patches at once, so that its weights (VGG's 103M-MAC first linear
        # layer, 411 MB) are read once per chunk rather than once per small batch.
        self.head = len(self.nodes)
        while self.kind[self.nodes[self.head - 1]] in (_OTHER, _CONST, _OUTPUT):
            self.head -= 1
        if compute_dtype not in (None, image.dtype):
            self.compute_dtype = compute_dtype
            self._lower_body(image)

    def _clean_pass(self, image, head):
        """Every node's value on the clean image (``self.clean``) and the model output
        (``self.output``, ``[1, ...]``): the body (the nodes before index ``head``) in its
        modules' dtype, the head's inputs cast to the image's dtype."""
        self.clean = {}
        with torch.no_grad():
            for i, n in enumerate(self.nodes):
                if n.op == "placeholder":
                    self.clean[n] = self._layout(image[None].to(self.compute_dtype or image.dtype)) \
                        if n is self.input else self._default(n)
                elif n.op != "output":
                    value = self.clean.__getitem__ if i < head else self._head_input
                    self.clean[n] = self._call(n, fx.node.map_arg((n.args, n.kwargs), value))
                    if n.op == "get_attr" and i < head and self.compute_dtype is not None:
                        self.clean[n] = self._cast(self.clean[n], self.compute_dtype)
                    if n in self.head_weights:  # copies: in-place layers after it change the values
                        self.head_clean[n] = value(n.args[0]).clone(), self.clean[n].clone()
        self.output = fx.node.map_arg(self.nodes[-1].args[0], self._head_input)

    def _lower_body(self, image):
        """Mixed precision: the body (every node before the head) runs on ``compute_dtype``
        copies of its modules, and the head in the image's dtype on the body's values cast
        up, so that the scores are not rounded to ``compute_dtype``: their rounding (2**-8 of a
        score in bfloat16) would swamp the small drops. The head's Linear layers apply
        ``compute_dtype`` weights to the change from the clean input only (``_run_head``)."""
        for i, n in enumerate(self.nodes):
            if n.op != "call_module" or self.kind[n] == _CONST:
                continue
            m = self.modules[n.target]
            if i < self.head:
                self.lowered[n] = _converted(self.cache, m, self.compute_dtype,
                                             lambda m: copy.deepcopy(m).to(self.compute_dtype))
                if n in self.window:
                    self.window[n] = _window_of(self.lowered[n], self.cache)
            elif isinstance(m, nn.Linear) and len(n.args) == 1 and not n.kwargs:
                self.head_weights[n] = _converted(self.cache, m.weight, self.compute_dtype,
                                                  lambda w: w.detach().to(self.compute_dtype))
        self._clean_pass(image, self.head)

    @staticmethod
    def _cast(v, dtype):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def _head_input(self, n):
        """A clean value as the head reads it: in the image's dtype."""
        return self._cast(self.clean[n], self.dtype)

    @staticmethod
    def _layout(image):
        """On CPU the clean pass and the patches run channels-last (the gather keeps it): there
        oneDNN's convolutions run 5-15% faster on the engine's small batches, and max pooling
        about 15x (channels-first max pooling is not vectorized over channels)."""
        return image.contiguous(memory_format=torch.channels_last) if image.device.type == "cpu" else image

    @staticmethod
    def _default(n):
        if not n.args:
            raise UnsupportedModel(str(n.target), TypeError("forward takes more than one input without default"))
        return n.args[0]

    def _call(self, n, args_kwargs):
        if not self._any_layout(n):
            # Channels-last maps are the engine's choice: other layers get the channels-first
            # tensors a model expects (``x.view(n, -1)`` fails on channels-last ones).
            args_kwargs = fx.node.map_aggregate(args_kwargs, _channels_first)
        args, kwargs = args_kwargs
        if n.op == "call_module":
            m = self.lowered.get(n)
            m = self.modules[n.target] if m is None else m
            if n in self.window and isinstance(m, nn.Conv2d):  # on full maps
                return m._conv_forward(args[0], _conv_weight(self.cache, m.weight, args[0]), m.bias)
            return m(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            return _getattr(self.model, n.target)
        raise AssertionError(n.op)

    def _any_layout(self, n) -> bool:
        """Whether node n is a layer the engine may run on channels-last maps."""
        if n.op == "call_module":
            return isinstance(self.modules[n.target], _ANY_LAYOUT_MODULES)
        if n.op == "call_function":
            return n.target in _POINTWISE_FUNCTIONS or n.target is torch.cat
        return n.op == "call_method" and n.target in _POINTWISE_METHODS

    def _spatial(self, n):
        """(H, W) of a node whose clean value is a [1, C, H, W] tensor, else None."""
        v = self.clean.get(n)
        return tuple(v.shape[2:]) if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == 1 else None

    def _classify(self, n):
        hw = self._spatial(n)
        if hw is None:
            return _OTHER
        if n.op == "call_module":
            m = self.modules[n.target]
            if not n.kwargs and len(n.args) == 1 and self._spatial(n.args[0]) is not None:
                window = _window_of(m, self.cache)
                if window is not None:
                    self.window[n] = window
                    return _WINDOW
                # Adaptive pooling to the input's own size (VGG's 7x7 avgpool at 224 px) is the identity.
                if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and self._spatial(n.args[0]) == hw:
                    self.identity.add(n)
                    return _POINTWISE
                if isinstance(m, _POINTWISE_MODULES) and not m.training and self._pointwise_args(n, hw):
                    return _POINTWISE
            return _OTHER
        if n.op == "call_function" and n.target is torch.cat:
            tensors = n.args[0]
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            if dim in (1, -3) and len(n.args) + len(n.kwargs) <= 2 and all(
                    isinstance(t, fx.Node) and self._spatial(t) == hw for t in tensors):
                return _CAT
            return _OTHER
        pointwise = (n.op == "call_function" and n.target in _POINTWISE_FUNCTIONS) or \
            (n.op == "call_method" and n.target in _POINTWISE_METHODS)
        return _POINTWISE if pointwise and self._pointwise_args(n, hw) else _OTHER

    def _pointwise_args(self, n, hw) -> bool:
        """Every tensor argument either has the node's map size or broadcasts over space."""
        for a in n.all_input_nodes:
            v = self.clean[a]
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if self._spatial(a) == hw:
                continue
            if self.kind.get(a, None) == _CONST and v.dim() >= 2 and v.shape[-2:] == (1, 1):
                continue
            return False
        return True

    # ----- planning: boxes of all positions, computed once (vectorized over positions) -----

    def plan(self, positions: np.ndarray, window) -> _Plan:
        N = len(positions)
        wh, ww = window
        boxes, full = {}, {}
        cost = np.zeros(N, dtype=np.float64)
        fallback = None
        for n in self.nodes:
            kind = self.kind[n]
            hw = self._spatial(n)
            if kind in (_CONST, _OUTPUT):
                continue
            if kind == _OTHER:
                # Heads (global pooling, flatten, linear) leave no map to update: no fallback.
                if fallback is None and hw is not None and hw != (1, 1) and not all(
                        full.get(a, np.ones(1, dtype=bool)).all() for a in n.all_input_nodes):
                    fallback = self._layer_name(n)
                full[n] = np.ones(N, dtype=bool)
                cost += self.macs[n]
                if hw is not None:
                    boxes[n] = np.tile(np.array([0, hw[0], 0, hw[1]], dtype=np.int64), (N, 1))
                continue
            inputs = [a for a in n.all_input_nodes if self.kind[a] != _CONST]
            if kind == _INPUT:
                # windows past the border are clipped there (Captum's last windows)
                box = np.stack([positions[:, 0], np.minimum(positions[:, 0] + wh, hw[0]),
                                positions[:, 1], np.minimum(positions[:, 1] + ww, hw[1])], 1)
            elif kind == _WINDOW:
                box = self._projective_field(boxes[inputs[0]], self.window[n], hw)
            else:  # union of the inputs' boxes
                stacked = np.stack([boxes[a] for a in inputs])
                box = np.stack([stacked[:, :, 0].min(0), stacked[:, :, 1].max(0),
                                stacked[:, :, 2].min(0), stacked[:, :, 3].max(0)], 1)
            box = self._cap(box, hw)
            area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
            is_full = np.logical_or.reduce([full[a] for a in inputs] + [area > FULL_FRACTION * hw[0] * hw[1]])
            box[is_full] = (0, hw[0], 0, hw[1])
            boxes[n], full[n] = box, is_full
            # A full patch's box is the whole map: its MACs are the layer's full count.
            cost += self.macs[n] * (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]) / (hw[0] * hw[1])
        return _Plan(boxes, full, cost, fallback)

    def _layer_name(self, n) -> str:
        """A node as users know it: ``'name' (Module)``, or the function or method called."""
        if n.op == "call_module":
            return f"{n.target!r} ({type(self.modules[n.target]).__name__})"
        return f"{n.name!r} ({getattr(n.target, '__name__', n.target)})"

    def _projective_field(self, box, window: _Window, hw):
        """Output box of a sliding-window layer whose input changed inside ``box``."""
        out = np.empty_like(box)
        for axis in range(2):
            k, s, p, d = window.kernel[axis], window.stride[axis], window.pad[axis], window.dilation[axis]
            a, b = box[:, 2 * axis], box[:, 2 * axis + 1]
            lo = -((d * (k - 1) - a - p) // s)                    # ceil((a + p - d(k-1)) / s)
            hi = (b - 1 + p) // s                                 # last output touching b - 1
            lo = np.clip(lo, 0, hw[axis] - 1)
            out[:, 2 * axis] = lo
            out[:, 2 * axis + 1] = np.clip(hi, lo, hw[axis] - 1) + 1
        return out

    def _cap(self, box, hw):
        """Krypton's projective-field threshold: each side at most ceil(tau * map side)."""
        if self.tau is None:
            return box
        box = box.copy()
        for axis in range(2):
            cap = max(1, math.ceil(self.tau * hw[axis]))
            a, b = box[:, 2 * axis], box[:, 2 * axis + 1]
            start = np.where(b - a > cap, np.clip((a + b - cap) // 2, 0, hw[axis] - cap), a)
            box[:, 2 * axis + 1] = np.minimum(b, start + cap)
            box[:, 2 * axis] = start
        return box

    def outputs(self, baseline: torch.Tensor, positions: torch.Tensor, window, batch_size: int | None = None):
        """Model outputs ``[P, ...]`` of the occluded copies (see ``incremental_outputs``)."""
        image = self.clean[self.input][0]
        check_tensor("baseline", baseline, ndim=3)
        if baseline.shape != image.shape:
            raise ValueError(f"baseline: expected shape {tuple(image.shape)} like image, got {tuple(baseline.shape)}")
        check_same_device(image=image, baseline=baseline, positions=positions)
        pos, window = _check_positions(image, positions, window)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size: expected None or an int >= 1, got {batch_size!r}")
        plan = self.plan(pos, window)
        if plan.fallback is not None:
            warnings.warn(f"incremental inference does not support layer {plan.fallback}: it and every "
                          f"layer after it run on full maps (exact, slower)", RuntimeWarning, stacklevel=3)
        if batch_size is None:
            largest = max((v.numel() * v.element_size() for v in self.clean.values() if isinstance(v, torch.Tensor)),
                          default=1)
            limit = _MAX_BATCH if image.is_cuda else _MAX_BATCH_CPU
            batch_size = int(min(limit, max(1, _BATCH_BUDGET_BYTES // (3 * largest))))
        order, batches = self._batches(plan, batch_size)
        baseline = baseline.to(image.dtype)
        with torch.no_grad():
            out = torch.cat(self._run_batches(plan, order, batches, baseline, pos, window))
            result = torch.empty_like(out)
            result[torch.from_numpy(order).to(out.device)] = out
        return result

    def _batches(self, plan: _Plan, batch_size: int):
        """The patches in run order and the (start, end) of each batch in it.

        Patches with the same box sizes at every node go together (groups in lexicographic
        order of those sizes, so neighbouring groups differ little); a batch closes at
        ``batch_size`` patches or before a patch whose padding would cost more MACs than
        running it on its own (its MACs plus one batch's overhead)."""
        sizes = np.concatenate([b[:, 1::2] - b[:, ::2] for b in plan.boxes.values()], 1)
        group = np.unique(sizes, axis=0, return_inverse=True)[1].reshape(-1)
        order = np.lexsort((plan.cost, group))
        # per conv node: MACs per output position, and each patch's box (in run order)
        convs = [n for n in plan.boxes if self.macs[n]]
        mac = np.array([self.macs[n] / math.prod(self._spatial(n)) for n in convs])
        box = np.stack([plan.boxes[n][order] for n in convs], 1) if convs else np.zeros((len(order), 0, 4), np.int64)
        h, w = box[..., 1] - box[..., 0], box[..., 3] - box[..., 2]
        own = (mac * h * w).sum(1)
        overhead = _NODE_OVERHEAD_MACS.get(self.clean[self.input].device.type, _NODE_OVERHEAD_MACS["cpu"]) * self.head
        batches, start = [], 0
        for i in range(len(order)):
            if i > start:
                new_h, new_w = np.maximum(top_h, h[i]), np.maximum(top_w, w[i])
                padded = (i - start + 1) * (mac * new_h * new_w).sum()
                if i - start < batch_size and padded - cost <= own[i] + overhead:
                    top_h, top_w, cost = new_h, new_w, padded
                    continue
                batches.append((start, i))
            start, top_h, top_w, cost = i, h[i], w[i], own[i]
        if len(order):
            batches.append((start, len(order)))
        return order, batches

    # ----- execution -----

    def _run_batches(self, plan, order, batches, baseline, positions, window):
        """Model outputs of the batches, in order: the body batch by batch, the head on the
        stacked body outputs of as many batches as ``_HEAD_CHUNK_BYTES`` holds (a body output
        that is not a tensor of the batch, e.g. ``x.size(0)``, keeps the head per batch)."""
        outs, pending, size = [], [], 0

        def flush():
            nonlocal size
            if pending:
                stacked = {a: torch.cat([p[a] for p, _ in pending]) for a in pending[0][0]}
                outs.append(self._run_head(stacked, sum(n for _, n in pending)))
                pending.clear()
            size = 0

        for s, e in batches:
            body = self.run(plan, order[s:e], baseline, positions, window, stop=self.head)
            if not all(isinstance(v, torch.Tensor) and v.dim() and len(v) == e - s for v in body.values()):
                flush()
                outs.append(self._run_head(body, e - s))
                continue
            pending.append((body, e - s))
            size += sum(v.numel() * v.element_size() for v in body.values())
            if size >= _HEAD_CHUNK_BYTES:
                flush()
        flush()
        return outs

    def _run_head(self, states: dict, P: int):
        """Model outputs ``[P, ...]`` from the head's inputs ``states`` (node -> full value)."""
        for n in self.nodes[self.head:]:
            if self.kind[n] == _CONST:
                states[n] = self.clean[n]
            elif self.kind[n] == _OUTPUT:
                return self._output(n, states.__getitem__, P)
            elif n in self.head_weights:
                # W x + b = (W x0 + b) + W (x - x0): only the change meets the rounding of compute_dtype
                clean_input, clean_output = self.head_clean[n]
                change = (states[n.args[0]] - clean_input).to(self.compute_dtype)
                states[n] = clean_output + F.linear(change, self.head_weights[n]).to(self.dtype)
            else:
                states[n] = self._call(n, fx.node.map_arg((n.args, n.kwargs), states.__getitem__))
        raise AssertionError("graph without output")

    def _output(self, n, value, P):
        out = fx.node.map_arg(n.args[0], value)
        return out if self.kind[n.args[0]] != _CONST else out.expand(P, *out.shape[1:])

    def run(self, plan: _Plan, index: np.ndarray, baseline: torch.Tensor, positions: np.ndarray, window,
            stop: int | None = None):
        """Model outputs ``[len(index), ...]`` for the patches ``index`` of ``plan``; with
        ``stop``, the full values of the nodes computed before node ``stop`` that it or later
        nodes use."""
        device = baseline.device
        P = len(index)
        states = {}

        def exec_box(n):
            hw = self._spatial(n)
            box = plan.boxes[n][index]
            size = (int((box[:, 1] - box[:, 0]).max()), int((box[:, 3] - box[:, 2]).max()))
            offsets = np.stack([np.clip(box[:, 0], 0, hw[0] - size[0]), np.clip(box[:, 2], 0, hw[1] - size[1])], 1)
            return offsets, size

        def to_device(offsets):
            return torch.from_numpy(np.ascontiguousarray(offsets)).to(device)

        def gather(n, offsets, size, fill=0.0):
            """Node n's values on the windows ``offsets``/``size`` for every patch."""
            state = states[n]
            clean = self.clean[n][0]
            if isinstance(state, _Region):
                return incremental_gather(clean, state.values, state.offsets, offsets, size, fill)
            return windows(clean, offsets, size, fill)

        def windows(source, offsets, size, fill=0.0):
            empty = source.new_empty((P, source.shape[0], 0, 0))
            return incremental_gather(source, empty, offsets, offsets, size, fill)

        def value(n):
            """Node n's full value for the batch (materializing a region onto its clean map)."""
            state = states[n]
            if isinstance(state, _Region):
                state = gather(n, torch.zeros_like(state.offsets), self._spatial(n))
                states[n] = state
            return state

        for i, n in enumerate(self.nodes):
            if i == stop:
                return {a: self._cast(value(a), self.dtype) for a in list(states)
                        if self.kind[a] != _CONST and self.last_use.get(a, -1) >= i}
            kind = self.kind[n]
            if kind == _CONST:
                states[n] = self.clean[n]
                continue
            if kind == _OUTPUT:
                return self._output(n, value, P)
            incremental = kind != _OTHER and not plan.full[n][index].any() and all(
                self.kind[a] == _CONST or isinstance(states[a], _Region) for a in n.all_input_nodes)
            if kind == _INPUT:
                pos = to_device(positions[index])
                states[n] = _Region(windows(baseline, pos, window), pos)
                if not incremental:
                    value(n)
            elif not incremental:
                states[n] = self._call(n, fx.node.map_arg((n.args, n.kwargs), value))
            else:
                hw = self._spatial(n)
                offsets, size = exec_box(n)
                dev_offsets = to_device(offsets)
                if kind == _WINDOW:
                    w = self.window[n]
                    halo = tuple(w.dilation[a] * (w.kernel[a] - 1) + (size[a] - 1) * w.stride[a] + 1 for a in range(2))
                    source = to_device(offsets * np.array(w.stride) - np.array(w.pad))
                    out = w.run(gather(n.args[0], source, halo, w.fill))
                else:
                    def operand(a):
                        state = states[a]
                        if self.kind[a] == _CONST and self._spatial(a) != hw:
                            return state  # broadcasts over space
                        if isinstance(state, _Region) and tuple(state.values.shape[2:]) == size and \
                                torch.equal(state.offsets, dev_offsets):
                            return state.values
                        return gather(a, dev_offsets, size)
                    out = operand(n.args[0]) if n in self.identity else \
                        self._call(n, fx.node.map_arg((n.args, n.kwargs), operand))
                states[n] = _Region(out, dev_offsets)
            for a in n.all_input_nodes:
                if self.last_use[a] == i and self.kind[a] != _CONST:
                    del states[a]
        raise AssertionError("graph without output")


def _getattr(model, target):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_positions(image, positions, window):
    check_tensor("positions", positions, ndim=2, floating=False)
    if positions.dtype != torch.int64 or positions.shape[1] != 2:
        raise ValueError(f"positions: expected an int64 tensor [P, 2], got {positions.dtype} {tuple(positions.shape)}")
    wh, ww = pair("window", window)
    H, W = image[-2:] if isinstance(image, (tuple, list, torch.Size)) else image.shape[-2:]
    if wh > H or ww > W:
        raise ValueError(f"window: {(wh, ww)} is larger than the image {(H, W)}")
    pos = positions.cpu().numpy()
    if len(pos) and ((pos < 0).any() or (pos[:, 0] >= H).any() or (pos[:, 1] >= W).any()):
        raise ValueError(f"positions: every window must start inside the image {(H, W)} "
                         f"(it may run past the border, clipped there)")
    return pos, (wh, ww)


def incremental_outputs(model: nn.Module, image: torch.Tensor, baseline: torch.Tensor,
                        positions: torch.Tensor, window, tau: float | None = None,
                        batch_size: int | None = None) -> torch.Tensor:
    """Model outputs for occluded copies of one image, by incremental inference (Krypton).

    image, baseline: ``[C, H, W]`` float tensors on the model's device (baseline already
    expanded). positions: int64 ``[P, 2]``, the (top, left) corner of each window inside the
    image; a window running past the border is clipped there (as Captum's last windows).
    window: int or ``(wh, ww)``. Returns ``[P, *out_shape[1:]]`` on the image's device, equal
    to ``model(x)`` with ``x[p] = image`` and its window ``p`` set to ``baseline``, to float32
    rounding (the model in eval mode), and independent of ``batch_size`` (patches per pass;
    None picks one from a 2 GiB budget, at most 16 on CPU, 64 on CUDA). tau: None for exact
    results, or Krypton's projective-field threshold in (0, 1]: approximate, each updated
    region capped at ``ceil(tau * map side)`` per side. Raises ``UnsupportedModel`` (with ``.layer``) when
    torch.fx cannot trace the model; warns (RuntimeWarning) naming the first traced layer it
    does not support, from which on it runs full maps.
    """
    return incremental_engine(model, image, tau).outputs(baseline, positions, window, batch_size)


def incremental_engine(model: nn.Module, image: torch.Tensor, tau: float | None = None,
                       compute_dtype: torch.dtype | None = None, cache: dict | None = None) -> _Engine:
    """The traced model with the clean activations of ``image [C, H, W]``: ``.output`` is the
    clean model output ``[1, ...]``, ``.outputs(baseline, positions, window, batch_size)``
    the occluded copies' outputs as ``incremental_outputs`` describes (reuse it for several
    lists of windows of one image). compute_dtype (approximate; e.g. ``torch.bfloat16``): the
    body (every node before the head of flatten/linear/global pooling) runs on copies of its
    modules in that dtype, the head in the image's dtype with its Linear layers applying
    compute_dtype weights to the change from the clean input; outputs in the image's dtype.
    cache: a dict shared by the engines of several images of one model, so that they share
    the converted weights and modules (channels-last, compute_dtype) instead of copying them."""
    check_tensor("image", image, ndim=3)
    if tau is not None and not 0 < tau <= 1:
        raise ValueError(f"tau: expected None or a fraction in (0, 1], got {tau!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype: expected None or a floating torch.dtype, got {compute_dtype!r}")
    return _Engine(model, image, tau, compute_dtype, cache)


def theoretical_flop_ratio(model: nn.Module, image_shape, positions: torch.Tensor, window) -> float:
    """Full re-inference MACs over incremental MACs, averaged over ``positions``.

    Counts the multiply-accumulates of Conv2d and Linear layers: full inference computes
    every output; incremental inference computes, per patch, each conv's updated box exactly
    as the engine plans it (clipped at borders, full maps past ``FULL_FRACTION`` or an
    unsupported layer), with batching's common box sizes left out. image_shape: ``(C, H, W)``.
    """
    param = next(iter(model.parameters()), None)
    image = torch.zeros(tuple(image_shape), dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else "cpu")
    pos, window = _check_positions(image, positions, window)
    engine = _Engine(model, image)
    plan = engine.plan(pos, window)
    return float(sum(engine.macs.values()) / plan.cost.mean())
