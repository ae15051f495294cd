"""Receptive fields of CNN units, exact, from a ``torch.fx`` trace of the model.

Each axis is followed separately through the graph with the classic recurrence (Araujo et
al. 2019, "Computing Receptive Fields of Convolutional Neural Networks"): a layer with
kernel k, stride s, padding p and dilation d maps (size, jump, start) to
``(size + (d (k - 1)) jump, jump s, start - p jump)``. Where paths join (residual adds,
concatenation along channels) the field is the union over paths: the smallest start and the
largest end. Nothing is computed on tensors: shapes are followed with the same formulas.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._checks import pair
from .._hooks import layer_name, resolve_layer

# Modules and functions that act on each position alone (in eval mode for BatchNorm and
# Dropout): the field passes through, and is the union of the fields of all tensor inputs.
_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
    nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.maximum, torch.minimum, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.dropout,
}
_POINTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "contiguous", "clone", "float", "double",
    "half", "to",
}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a layer's units, per axis as ``(h, w)``, in input pixels.

    size: extent of one unit's field; jump: distance between the fields of neighbouring
    units (the layer's stride in input pixels); offset: input coordinate of the first row and
    column of unit (0, 0)'s field (negative where the field reaches into padding);
    feature_size: the layer's ``(h, w)`` for ``input_size``. Unit (i, j) sees rows
    ``offset[0] + i * jump[0]`` to that plus ``size[0] - 1``, likewise for columns.
    """

    size: tuple
    jump: tuple
    offset: tuple
    feature_size: tuple
    input_size: tuple

    def box(self, i: int, j: int) -> tuple:
        """``(top, left, bottom, right)`` of unit (i, j)'s field, half-open, unclipped."""
        top = self.offset[0] + i * self.jump[0]
        left = self.offset[1] + j * self.jump[1]
        return top, left, top + self.size[0], left + self.size[1]


@dataclass(frozen=True)
class _Axis:
    size: int   # field extent of one unit
    jump: int   # input pixels between neighbouring units
    start: int  # first input pixel of unit 0
    n: int      # number of units along this axis

    def window(self, kernel, stride, padding, dilation, ceil_mode=False):
        span = dilation * (kernel - 1)
        n = (self.n + 2 * padding - span - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
        if ceil_mode and (n - 1) * stride >= self.n + padding:
            n -= 1  # PyTorch drops a last window that would start in the right padding
        if n < 1:
            raise ValueError("input_size: too small, a feature map along the path has no units left")
        return _Axis(self.size + span * self.jump, self.jump * stride, self.start - padding * self.jump, n)


def _union(fields, where):
    first = fields[0]
    for f in fields[1:]:
        if f[0].jump != first[0].jump or f[1].jump != first[1].jump:
            raise NotImplementedError(f"receptive_field: paths joining at {where} have different strides")
    out = []
    for axis in (0, 1):
        start = min(f[axis].start for f in fields)
        end = max(f[axis].start + f[axis].size for f in fields)
        out.append(_Axis(end - start, first[axis].jump, start, max(f[axis].n for f in fields)))
    return tuple(out)


def _conv_padding(module: nn.Conv2d):
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":  # PyTorch pads the smaller half on the left/top
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return module.padding


def _windowed(field, kernel, stride, padding, dilation=1, ceil_mode=False):
    kernel, padding, dilation = (pair("kernel", v, 0) for v in (kernel, padding, dilation))
    stride = kernel if stride is None or stride == [] else pair("stride", stride, 1)
    return tuple(field[a].window(kernel[a], stride[a], padding[a], dilation[a], ceil_mode) for a in (0, 1))


def _adaptive(field, output_size, where):
    out = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    axes = []
    for a, o in zip(field, out):
        o = a.n if o is None else o
        if a.n % o:
            raise NotImplementedError(
                f"receptive_field: {where} pools {a.n} units into {o} bins of unequal size; its units "
                f"have no common field (choose an input size divisible by the output size)")
        axes.append(a.window(a.n // o, a.n // o, 0, 1))
    return tuple(axes)


def _module_field(module, field, where):
    if isinstance(module, nn.Conv2d):
        return _windowed(field, module.kernel_size, module.stride, _conv_padding(module), module.dilation)
    if isinstance(module, nn.MaxPool2d):
        return _windowed(field, module.kernel_size, module.stride, module.padding, module.dilation,
                         module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return _windowed(field, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode)
    if isinstance(module, _ADAPTIVE_POOLS):
        return _adaptive(field, module.output_size, where)
    if isinstance(module, _POINTWISE_MODULES):
        return field
    if fx.Tracer().is_leaf_module(module, ""):  # a torch.nn layer of another kind
        raise NotImplementedError(
            f"receptive_field: cannot follow {type(module).__name__} at {where} (a layer that is not a "
            f"convolution, pooling or pointwise layer, e.g. Linear or a reshape, has no spatial field)")
    return _traced_field(module, fx.Tracer().trace(module), [field], stop=None)


def _function_field(node, fields, where):
    fn, args, kwargs = node.target, node.args, node.kwargs
    if node.op == "call_function" and fn in (F.max_pool2d, F.avg_pool2d):
        names = ("kernel_size", "stride", "padding") + (("dilation",) if fn is F.max_pool2d else ())
        params = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
        return _windowed(fields[0], params["kernel_size"], params.get("stride"), params.get("padding", 0),
                         params.get("dilation", 1), kwargs.get("ceil_mode", False))
    if node.op == "call_function" and fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return _adaptive(fields[0], args[1] if len(args) > 1 else kwargs["output_size"], where)
    if node.op == "call_function" and fn is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise NotImplementedError(f"receptive_field: {where} concatenates along dim {dim}, not channels")
        return _union(fields, where)
    if (node.op == "call_function" and fn in _POINTWISE_FUNCTIONS) or \
            (node.op == "call_method" and fn in _POINTWISE_METHODS):
        return _union(fields, where)
    raise NotImplementedError(f"receptive_field: cannot follow {getattr(fn, '__name__', fn)} at {where}")


def _traced_field(root, graph, inputs, stop):
    """Fields of the graph's nodes in order; returns the field of ``stop`` (a module) or of
    the graph's output. A node with no spatial input (a constant, a size) has no field."""
    env, placeholders = {}, iter(inputs)
    for node in graph.nodes:
        if node.op == "output":
            return env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            env[node] = next(placeholders, None)
            continue
        fields = [env[a] for a in node.all_input_nodes if env.get(a) is not None]
        where = f"node {node.name!r}"
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if module is stop:
                if not fields:
                    raise ValueError(f"layer: its input at {where} carries no image")
                return _module_field(module, _union(fields, where), f"{where} ({node.target})")
            env[node] = _module_field(module, _union(fields, where), f"{where} ({node.target})") if fields else None
        elif node.op in ("call_function", "call_method"):
            env[node] = _function_field(node, fields, where) if fields else None
        else:
            env[node] = None
    raise ValueError("layer: the traced forward pass never calls it")


class _LeafTracer(fx.Tracer):
    """The default tracer, with the requested layer kept whole as one call."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m, qualname):
        return m is self.layer or super().is_leaf_module(m, qualname)


def receptive_field(model: nn.Module, layer, input_size) -> ReceptiveField:
    """The receptive field of ``layer``'s units for inputs of ``input_size`` (int or (H, W)).

    Exact through convolutions, max/avg pooling (padding, dilation, ceil_mode), pointwise
    layers and joined paths (residual adds, channel concatenation: the union over paths),
    following the recurrence of Araujo et al. 2019 per axis on a ``torch.fx`` trace; the
    model is not run. Adaptive pooling is followed when its bins are equal (input divisible
    by output size, e.g. global pooling); unequal bins, Linear, reshapes and other layers
    without a spatial field raise ``NotImplementedError`` naming the node. The layer must be
    called once per forward pass. BatchNorm and Dropout are taken as in eval mode.
    Returns a ``ReceptiveField`` (sizes in input pixels, per axis (h, w)).
    """
    module = resolve_layer(model, layer)
    size = pair("input_size", input_size)
    try:
        graph = _LeafTracer(module).trace(model)
    except Exception as err:  # symbolic tracing fails on data-dependent control flow
        raise NotImplementedError(f"receptive_field: torch.fx cannot trace {type(model).__name__}: {err}") from err
    calls = [n for n in graph.nodes if n.op == "call_module" and model.get_submodule(n.target) is module]
    if len(calls) > 1:
        raise ValueError(f"layer: {layer_name(model, module)!r} is called {len(calls)} times per forward pass; "
                         f"its units have no single receptive field")
    identity = tuple(_Axis(1, 1, 0, n) for n in size)
    field = _traced_field(model, graph, [identity], stop=module)
    return ReceptiveField(size=(field[0].size, field[1].size), jump=(field[0].jump, field[1].jump),
                          offset=(field[0].start, field[1].start), feature_size=(field[0].n, field[1].n),
                          input_size=size)
