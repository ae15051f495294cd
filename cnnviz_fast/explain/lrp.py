"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019), matching zennit.

``lrp(model, x, target, rules=...)`` returns the relevance of every input element. The rule
sets are zennit's composites (``EpsilonPlusFlat``, ``EpsilonGammaBox``, ``EpsilonPlus``,
``EpsilonAlpha2Beta1``, ``EpsilonAlpha2Beta1Flat``, with zennit's default parameters) with its
canonizers applied: batch norms that follow a convolution or linear layer are folded into it
(``SequentialMergeBatchNorm`` / ``VGGCanonizer``) and ResNet blocks add their two branches with
the stabilised ``Norm`` rule (``ResNetCanonizer``). Custom rule maps take the rule classes of
this module (:class:`Epsilon`, :class:`ZPlus`, :class:`AlphaBeta`, :class:`Gamma`,
:class:`Flat`, :class:`ZBox`, :class:`Pass`, :class:`Norm`).

How it runs: relevance is what flows through one autograd backward pass (as in zennit). Each
covered layer's forward is swapped, for the duration of the call, for an autograd function whose
forward computes the layer's normal output together with the rule's modified pre-activations
``z`` (several weight variants in one convolution where the layer is not grouped; the sign
split of the input is skipped when the input has one sign, as after a ReLU) and whose backward
is the rule's "gradient x input" form, ``R_in = sum_i a_i * (W_i^T (R / stab(z)))``, one
transposed convolution per input variant. zennit instead runs the normal backward pass as well
and re-runs every layer's modified forward and backward inside hooks. Parameters are never
modified (folded weights are new tensors) and never get gradients; hooks and swapped forwards
are removed also when the model raises.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from .._hooks import explanation, frozen_parameters
from .._precision import lowered
from .._targets import target_scores

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEARS = _CONVS + (nn.Linear,)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# zennit.types.Activation: relevance passes these unchanged.
_ACTIVATIONS = (nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU,
                nn.LogSigmoid, nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU,
                nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink,
                nn.Threshold)
# Layers whose plain gradient already routes relevance as LRP does (zennit gives them no rule).
_ROUTING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
            nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# torchvision's ResNet blocks (and cnnviz_fast.models'): (conv, batch norm) attribute pairs.
_RESNET_BLOCKS = {"BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
                  "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))}


def _stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's ``stabilize``, ``z + epsilon * sign(z)`` with sign(0) = +1, in two passes.

    copysign gives -0.0 the sign -1; that changes nothing: a sum is -0.0 only when all its
    terms are zeros, and then every relevance share ``a_i w_i R / z`` is zero anyway."""
    return torch.copysign(z.new_tensor(epsilon), z).add_(z)


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


class _Lazy:
    """A weight variant computed on first use only: parts whose input is all zeros (the negative
    part after a ReLU) never build their weights."""

    def __init__(self, fn, *args):
        self.fn, self.args, self.value = fn, args, None

    def __call__(self):
        if self.value is None:
            self.value = self.fn(*self.args)
        return self.value


def _resolve(w):
    return w() if isinstance(w, _Lazy) else w


class Rule:
    """Base of the LRP rules; ``stabilizer`` is the epsilon added (with the sign of ``z``) to
    every denominator."""

    def __init__(self, stabilizer: float = 1e-6):
        check_number("stabilizer", stabilizer, 0)
        self.stabilizer = float(stabilizer)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({args})"


class LinearRule(Rule):
    """A rule for convolution and linear layers, given as terms ``(coef, mask, parts)``:
    ``z_t = sum over parts (source, W, b) of layer(source, W) + b``, and the relevance
    ``R_in = sum_t coef_t sum_parts source * W^T (mask_t R / stab(z_t))``. A source is the input
    ``"x"``, its positive or negative part ``"pos"``/``"neg"``, ``"ones"`` or a constant tensor;
    ``mask`` (``None``, ``"pos"``, ``"neg"``) keeps the units whose normal output has that sign.
    A weight may be a ``_Lazy`` variant, built only if its part is used."""

    def terms(self, weight, bias, x):
        raise NotImplementedError


class Epsilon(LinearRule):
    """LRP-epsilon (Bach et al. 2015; zennit ``Epsilon``): ``R_in = x * W^T (R / stab(Wx + b))``;
    ``epsilon=0`` is LRP-0."""

    def __init__(self, epsilon: float = 1e-6):
        super().__init__(check_number("epsilon", epsilon, 0))

    def terms(self, weight, bias, x):
        return [(1.0, None, [("x", weight, bias)])]


class ZPlus(LinearRule):
    """LRP-z+ (zennit ``ZPlus``, alpha=1 beta=0 with negative inputs allowed):
    ``z = W+ x+ + W- x- + b+``."""

    def terms(self, weight, bias, x):
        return [(1.0, None, [("pos", _Lazy(_pos, weight), _pos(bias)), ("neg", _Lazy(_neg, weight), None)])]


class AlphaBeta(LinearRule):
    """LRP-alpha-beta (Bach et al. 2015; zennit ``AlphaBeta``): ``alpha`` times the z+ relevance
    of the positive contributions minus ``beta`` times that of the negative ones; alpha - beta = 1."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        check_number("alpha", alpha, 0)
        check_number("beta", beta, 0)
        if alpha - beta != 1:
            raise ValueError(f"alpha, beta: expected alpha, beta >= 0 with alpha - beta = 1, got {alpha}, {beta}")
        super().__init__(stabilizer)
        self.alpha, self.beta = float(alpha), float(beta)

    def terms(self, weight, bias, x):
        wp, wn = _Lazy(_pos, weight), _Lazy(_neg, weight)
        return [(self.alpha, None, [("pos", wp, _pos(bias)), ("neg", wn, None)]),
                (-self.beta, None, [("pos", wn, _neg(bias)), ("neg", wp, None)])]


class Gamma(LinearRule):
    """Generalised LRP-gamma (Montavon et al. 2019; Andéol et al. 2021; zennit ``Gamma``):
    for units with a positive output ``z = (W + gamma W+) x+ + (W + gamma W-) x- + b + gamma b+``,
    for negative outputs the same with W+ and W- swapped."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        super().__init__(stabilizer)
        self.gamma = float(check_number("gamma", gamma, 0))

    def terms(self, weight, bias, x):
        g = self.gamma
        w_up = _Lazy(lambda: weight + g * weight.clamp(min=0))
        w_down = _Lazy(lambda: weight + g * weight.clamp(max=0))
        b_up = None if bias is None else bias + g * bias.clamp(min=0)
        b_down = None if bias is None else bias + g * bias.clamp(max=0)
        return [(1.0, "pos", [("pos", w_up, b_up), ("neg", w_down, None)]),
                (1.0, "neg", [("pos", w_down, b_down), ("neg", w_up, None)])]


class Flat(LinearRule):
    """LRP-flat (Lapuschkin et al. 2019; zennit ``Flat``): all weights one, no bias, input ones:
    relevance spreads evenly over each unit's receptive field."""

    def terms(self, weight, bias, x):
        return [(1.0, None, [("ones", torch.ones_like(weight), None)])]


class ZBox(LinearRule):
    """LRP-z^B for inputs bounded by ``low <= x <= high`` (Montavon et al. 2017; zennit ``ZBox``):
    ``z = (Wx + b) - (W+ low + b+) - (W- high + b-)``. ``low``/``high``: floats or tensors that
    broadcast to the layer input (e.g. ``[1, C, 1, 1]`` per channel)."""

    def __init__(self, low, high, stabilizer: float = 1e-6):
        super().__init__(stabilizer)
        self.low, self.high = low, high

    def terms(self, weight, bias, x):
        low, high = _box_bound("low", self.low, x), _box_bound("high", self.high, x)
        return [(1.0, None, [("x", weight, bias), (-low, _pos(weight), None if bias is None else -_pos(bias)),
                             (-high, _neg(weight), None if bias is None else -_neg(bias))])]


class Pass(Rule):
    """Relevance passes unchanged (zennit ``Pass``): activations and batch norms."""


class Norm(Rule):
    """``R_in = x * J^T (R / stab(y))`` for parameter-free linear layers (zennit ``Norm``): average
    pooling and the sum of a residual connection."""


def _box_bound(name, value, x):
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    one = (1,) + tuple(x.shape[1:])
    for shape in (one, tuple(x.shape)):
        try:
            if torch.broadcast_shapes(t.shape, shape) == shape:
                return t.expand(shape)
        except RuntimeError:
            pass
    raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to the first layer's input "
                     f"shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------
# Autograd functions: forward computes the layer's output, backward propagates relevance.

class _LinearRuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        y, denominators, backward_plan = layer.relevance_forward(x)
        ctx.layer, ctx.plan = layer, backward_plan
        ctx.save_for_backward(x, *denominators)
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, *denominators = ctx.saved_tensors
        return ctx.layer.relevance_backward(x, denominators, ctx.plan, relevance), None


class _PassFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        y = type(module).forward(module, x)
        if y is x:  # an in-place activation
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, stabilizer):
        y = type(module).forward(module, x)
        ctx.module = module
        ctx.save_for_backward(x, _stabilize(y, stabilizer))
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, denominator = ctx.saved_tensors
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(type(ctx.module).forward(ctx.module, xi), xi, relevance / denominator)
        return x * grad, None, None


class _NormSumFn(torch.autograd.Function):
    """``a + b`` with the Norm rule: zennit's ``Sum`` module of a canonized ResNet block."""

    @staticmethod
    def forward(ctx, a, b, stabilizer):
        out = a + b
        ctx.save_for_backward(a, b, _stabilize(out, stabilizer))
        return out

    @staticmethod
    def backward(ctx, relevance):
        a, b, denominator = ctx.saved_tensors
        scaled = relevance / denominator
        return a * scaled, b * scaled, None


# --------------------------------------------------------------------------------------------
# Layers under a rule.

class _RuleLayer:
    """A convolution or linear layer (its batch norm folded in) under a :class:`LinearRule`."""

    def __init__(self, module, name, rule, weight, bias):
        self.module, self.name, self.rule, self.weight, self.bias = module, name, rule, weight, bias
        self.conv_dims = module.weight.dim() - 2 if isinstance(module, _CONVS) else 0
        if self.conv_dims:
            if module.padding_mode != "zeros":
                raise ValueError(f"rules: layer {name!r} pads with {module.padding_mode!r}; lrp supports "
                                 f"zero padding only")
            self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
            self.padding = _int_padding(module, name)

    def forward(self, x):
        return _LinearRuleFn.apply(x, self)

    def _apply(self, src, weight, bias):
        if not self.conv_dims:
            return F.linear(src, weight, bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.conv_dims - 1]
        return conv(src, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _apply_many(self, src, pairs):
        """``[layer(src, W, b) for W, b in pairs]``, as one call where the weights stack."""
        if len(pairs) == 1 or self._grouped():
            return [self._apply(src, w, b) for w, b in pairs]
        weight = torch.cat([w for w, _ in pairs])
        bias = None
        if any(b is not None for _, b in pairs):
            bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in pairs])
        out = self._apply(src, weight, bias)
        return out.split([w.shape[0] for w, _ in pairs], dim=1 if self.conv_dims else -1)

    def _grouped(self):
        return bool(self.conv_dims) and self.groups != 1

    def _transpose_many(self, items, shape):
        """``sum W^T s for s, W in items``: the input gradient of the layer, one call where it stacks."""
        if len(items) > 1 and not self._grouped():
            items = [(torch.cat([s for s, _ in items], dim=1 if self.conv_dims else -1),
                      torch.cat([w for _, w in items]))]
        total = None
        for s, w in items:
            if self.conv_dims:
                grad_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input,
                              torch.nn.grad.conv3d_input)[self.conv_dims - 1]
                g = grad_input(shape, w, s, self.stride, self.padding, self.dilation, self.groups)
            else:
                g = s @ w
            total = g if total is None else total + g
        return total

    def relevance_forward(self, x):
        terms = self.rule.terms(self.weight, self.bias, x)
        y = self._apply(x, self.weight, self.bias)
        lo = hi = None
        if any(src in ("pos", "neg") for _, _, parts in terms for src, _, _ in parts):
            # an empty batch has no sign: keep both parts, so the (empty) shapes flow through
            lo, hi = (v.item() for v in torch.aminmax(x)) if x.numel() else (-1.0, 1.0)
        # source key -> [source tensor, [(W, b)], [term index per (W, b)]]
        groups = {}
        for t, (_, _, parts) in enumerate(terms):
            for src, w, b in parts:
                key, tensor = _source(src, x, lo, hi)
                if key is None:  # an input part that is all zeros contributes nothing
                    continue
                group = groups.setdefault(key, [tensor, [], []])
                group[1].append((_resolve(w), b))
                group[2].append(t)
        z = [None] * len(terms)
        for key, (tensor, pairs, owners) in groups.items():
            # a part equal to the layer itself (epsilon, z^B's first part) reuses its output
            own = [key == "x" and w is self.weight and b is self.bias for w, b in pairs]
            fresh = [p for p, o in zip(pairs, own) if not o]
            computed = iter(self._apply_many(tensor, fresh) if fresh else ())
            outs = [y if o else next(computed) for o in own]
            for out, t in zip(outs, owners):
                z[t] = out if z[t] is None else z[t] + out
        denominators, live = [], []
        for t, (_, mask, _) in enumerate(terms):
            if z[t] is None:
                continue
            d = _stabilize(z[t], self.rule.stabilizer)
            if mask is not None:
                keep = y > 0 if mask == "pos" else y < 0
                d = torch.where(keep, d, math.inf)  # R / inf = 0 off the mask
            denominators.append(d)
            live.append(t)
        slot = {t: i for i, t in enumerate(live)}
        plan = ([terms[t][0] for t in live],
                [(key, None if key in ("x", "ones") else tensor, [(w, slot[t]) for (w, _), t in zip(pairs, owners)])
                 for key, (tensor, pairs, owners) in groups.items()])
        return y, denominators, plan

    def relevance_backward(self, x, denominators, plan, relevance):
        coefs, groups = plan
        scaled = [relevance / d if c == 1 else c * (relevance / d) for c, d in zip(coefs, denominators)]
        total = None
        for key, tensor, items in groups:
            g = self._transpose_many([(scaled[i], w) for w, i in items], x.shape)
            part = g if key == "ones" else (x if key == "x" else tensor) * g
            total = part if total is None else total + part
        return total if total is not None else torch.zeros_like(x)


def _source(src, x, lo, hi):
    """(group key, tensor) of a rule's input variant; key None where the variant is all zeros."""
    if isinstance(src, torch.Tensor):
        return f"const{id(src)}", src
    if src == "ones":
        return "ones", x.new_ones((1,) + tuple(x.shape[1:]))
    if src == "pos":
        return ("x", x) if lo >= 0 else (None, None) if hi <= 0 else ("pos", x.clamp(min=0))
    if src == "neg":
        return ("x", x) if hi <= 0 else (None, None) if lo >= 0 else ("neg", x.clamp(max=0))
    return "x", x


def _int_padding(module, name):
    if not isinstance(module.padding, str):
        return module.padding
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"rules: layer {name!r} uses asymmetric 'same' padding, which lrp does not support")
    return tuple(t // 2 for t in total)


# --------------------------------------------------------------------------------------------
# Rule sets (zennit's composites) and canonization.

def _composite(name, epsilon, gamma, stabilizer, low, high):
    """(first-layer map, layer map) of zennit's composite ``name`` as (types, rule) pairs."""
    eps = Epsilon(epsilon)
    if name == "epsilon_plus_flat":
        return [(_LINEARS, Flat(stabilizer))], [(_CONVS, ZPlus(stabilizer)), (nn.Linear, eps)]
    if name == "epsilon_gamma_box":
        if low is None or high is None:
            raise ValueError("low, high: rules='epsilon_gamma_box' needs the bounds of the input values "
                             "for its first layer's z^B rule (e.g. low=0., high=1. for images in [0, 1])")
        return ([(_CONVS, ZBox(low, high, stabilizer))],
                [(_CONVS, Gamma(gamma, stabilizer)), (nn.Linear, eps)])
    if name == "epsilon_plus":
        return [], [(_CONVS, ZPlus(stabilizer)), (nn.Linear, eps)]
    if name == "epsilon_alpha2_beta1":
        return [], [(_CONVS, AlphaBeta(2.0, 1.0, stabilizer)), (nn.Linear, eps)]
    if name == "epsilon_alpha2_beta1_flat":
        return [(_LINEARS, Flat(stabilizer))], [(_CONVS, AlphaBeta(2.0, 1.0, stabilizer)), (nn.Linear, eps)]
    raise ValueError(f"rules: unknown rule set {name!r}; expected one of {', '.join(RULE_SETS)} "
                     f"or a dict {{layer name or module type: rule}}")


RULE_SETS = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1",
             "epsilon_alpha2_beta1_flat")


def _leaves(module):
    """zennit's ``collect_leaves``: leaf modules depth-first in registration order."""
    children = list(module.children())
    if not children:
        yield module
    for child in children:
        yield from _leaves(child)


def _rule_table(model, rules, epsilon, gamma, stabilizer, low, high):
    """{module: rule} for every leaf the rules cover, matching zennit's composite mapping."""
    base = [(_ACTIVATIONS, Pass()), (_AVG_POOLS, Norm(stabilizer)), (_BATCH_NORMS, Pass())]
    names = dict(model.named_modules())
    by_name, first_map = {}, []
    if isinstance(rules, str):
        first_map, layer_map = _composite(rules, epsilon, gamma, stabilizer, low, high)
        layer_map = base + layer_map
    elif isinstance(rules, dict):
        layer_map = []
        for key, rule in rules.items():
            if not isinstance(rule, Rule):
                raise TypeError(f"rules: the rule for {key!r} must be a Rule instance (Epsilon(), ZPlus(), "
                                f"Gamma(), ...), got {type(rule).__name__}")
            if isinstance(key, str):
                if key not in names or key == "":
                    raise ValueError(f"rules: no module named {key!r} in {type(model).__name__}")
                if any(True for _ in names[key].children()):
                    raise ValueError(f"rules: {key!r} is a container; give rules to its layers")
                by_name[names[key]] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                layer_map.append((key, rule))
            else:
                raise TypeError(f"rules: keys must be layer names or module types, got {key!r}")
        layer_map += base
    else:
        raise TypeError(f"rules: expected a rule-set name or a dict, got {type(rules).__name__}")
    table, first_done = {}, False
    for _, module in model.named_modules():
        if module in by_name:
            table[module] = by_name[module]
            continue
        if not first_done:
            rule = next((r for types, r in first_map if isinstance(module, types)), None)
            if rule is not None:
                table[module], first_done = rule, True
                continue
        rule = next((r for types, r in layer_map if isinstance(module, types)), None)
        if rule is not None and not any(True for _ in module.children()):
            table[module] = rule
    return table


def _folded(linear, bn):
    """zennit's ``MergeBatchNorm``: the batch norm's affine map folded into the layer; the merged
    batch norm then computes ``x / sqrt(1 + eps)``, which is folded in too."""
    denominator = (bn.running_var + bn.eps) ** 0.5
    scale = (bn.weight if bn.weight is not None else torch.ones_like(denominator)) / denominator
    shift = bn.bias if bn.bias is not None else torch.zeros_like(denominator)
    weight = linear.weight * scale.view((-1,) + (1,) * (linear.weight.dim() - 1))
    bias = (linear.bias if linear.bias is not None else 0.0) - bn.running_mean
    bias = bias * scale + shift
    identity_bn = (1.0 + bn.eps) ** -0.5
    return weight * identity_bn, bias * identity_bn


def _describe(rules):
    return repr(rules) if isinstance(rules, str) else "the custom rule map"


def _plan(model, rules, epsilon, gamma, stabilizer, low, high, canonize):
    """{module: replacement forward}; raises naming the first layer no rule covers."""
    table = _rule_table(model, rules, epsilon, gamma, stabilizer, low, high)
    folds, previous = {}, None
    if canonize:
        for leaf in _leaves(model):
            if (isinstance(previous, _LINEARS) and isinstance(leaf, _BATCH_NORMS)
                    and leaf.running_mean is not None and previous not in folds):
                folds[previous] = leaf
            previous = leaf
    folded_bns = set(folds.values())
    forwards = {}
    for name, module in model.named_modules():
        if canonize and type(module).__name__ in _RESNET_BLOCKS and _is_resnet_block(module):
            forwards[module] = _resnet_block_forward(module, _RESNET_BLOCKS[type(module).__name__], stabilizer)
        if any(True for _ in module.children()):
            continue
        rule = table.get(module)
        if module in folded_bns:
            forwards[module] = _identity
        elif isinstance(rule, LinearRule):
            if not isinstance(module, _LINEARS):
                raise ValueError(f"rules: {type(rule).__name__} applies to convolution and linear layers, "
                                 f"not to layer {name!r} ({type(module).__name__})")
            bn = folds.get(module)
            weight, bias = _folded(module, bn) if bn is not None else (module.weight, module.bias)
            forwards[module] = _RuleLayer(module, name, rule, weight, bias).forward
        elif isinstance(rule, Pass):
            forwards[module] = _bound(_PassFn.apply, module)
        elif isinstance(rule, Norm):
            forwards[module] = _bound(_NormFn.apply, module, rule.stabilizer)
        elif not isinstance(module, _ROUTING):
            label = name or "<model>"
            raise ValueError(f"rules: layer {label!r} ({type(module).__name__}) is not covered by "
                             f"{_describe(rules)}; map it to a rule, e.g. {{{label!r}: Pass()}}")
    return forwards


def _identity(x):
    return x


def _bound(fn, *args):
    def forward(x):
        return fn(x, *args)
    return forward


def _is_resnet_block(module):
    pairs = _RESNET_BLOCKS[type(module).__name__]
    return all(hasattr(module, a) for pair in pairs for a in pair) and hasattr(module, "relu") \
        and hasattr(module, "downsample")


def _resnet_block_forward(block, pairs, stabilizer):
    """zennit.torchvision's canonized block forward: the residual sum under the Norm rule."""
    def forward(x):
        out = x
        for i, (conv, bn) in enumerate(pairs):
            out = getattr(block, bn)(getattr(block, conv)(out))
            if i < len(pairs) - 1:
                out = block.relu(out)
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(_NormSumFn.apply(identity, out, stabilizer))
    return forward


@contextlib.contextmanager
def _swapped_forwards(model, forwards):
    """The rules' forwards for the block; the originals restored, also on errors."""
    saved = [(m, m.__dict__.get("forward")) for m in forwards]
    try:
        for module, fn in forwards.items():
            module.forward = fn
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


@explanation(ndim=(2, 3, 4, 5))
def lrp(model: nn.Module, x: torch.Tensor, target, rules="epsilon_plus_flat", *, epsilon: float = 1e-6,
        gamma: float = 0.25, stabilizer: float = 1e-6, low=None, high=None, canonize: bool = True,
        compute_dtype: torch.dtype | None = None, channels_last: bool | None = None):
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019), matching
    zennit's composites with their canonizers.

    Args:
        model: any ``nn.Module`` of convolution/linear layers, activations, batch norms, pooling,
            dropout and flatten layers (other layers need a rule in a custom map). Explained in
            eval mode (batch norms with their running statistics); its modes are restored.
        x: input ``[B, C, H, W]`` (or ``[B, *shape]``), floating point, on the model's device.
        target: an int, one int per sample, a ``[B, k]`` tensor, or a callable ``output -> [B]``
            scores. The output relevance is ``output * d(score)/d(output)``: the target logit for
            class indices, so the input relevance sums to about the score.
        rules: a rule set, zennit's composite of the same name with its default parameters:
            ``"epsilon_plus_flat"`` (first linear layer Flat, convolutions ZPlus, linear layers
            Epsilon), ``"epsilon_gamma_box"`` (first convolution ZBox(low, high), convolutions
            Gamma(gamma), linear layers Epsilon), ``"epsilon_plus"``, ``"epsilon_alpha2_beta1"``,
            ``"epsilon_alpha2_beta1_flat"``; or a dict ``{layer name | module type: Rule}``
            (names first, then types in dict order; activations and batch norms default to
            :class:`Pass`, average pooling to :class:`Norm`). A convolution or linear layer (or any
            other layer) that no rule covers raises ``ValueError`` naming it.
        epsilon: the Epsilon rule's epsilon; ``stabilizer``: the other rules' denominator epsilon.
        gamma: the Gamma rule's gamma. ``low``, ``high``: the input bounds of the ZBox rule
            (floats or tensors broadcasting to ``x``), required by ``"epsilon_gamma_box"``.
        canonize: fold batch norms that follow a convolution or linear layer into it and give
            ResNet blocks (torchvision's ``BasicBlock``/``Bottleneck`` structure) a Norm-rule
            residual sum, as zennit's ``SequentialMergeBatchNorm``/``ResNetCanonizer`` do (like
            zennit's, the merged batch norm still divides by ``sqrt(1 + eps)``, so the relevance
            sums to the output of the canonized model, about ``1e-5`` relative off per batch norm).
        compute_dtype, channels_last: the rules run on a copy of the model converted once per
            call (``cnnviz_fast._precision``; by default on CPU channels-last, its batch norms
            left to ``canonize``; ``channels_last=False``: the model's own layout):
            ``torch.bfloat16`` puts the body's layers, their folded batch norms and their rules'
            relevance in bfloat16, the ``nn.Linear`` layers and the output relevance in ``x``'s
            dtype; the relevance comes back in ``x``'s dtype.

    Returns:
        Relevance with ``x``'s shape, dtype and device, ``[B, k, *x.shape[1:]]`` for ``[B, k]``
        targets (one forward pass, one backward pass per target column). Equal to zennit's
        attribution (with the target logit as output relevance) to 1e-9 in float64; in float32
        both round differently where a pre-activation is near zero, which on random-weight
        networks reaches 1e-3 to 1e-2 of the relevance scale for either library.
    """
    model, _ = lowered(model, x, compute_dtype, channels_last, fold=False)
    forwards = _plan(model, rules, epsilon, gamma, stabilizer, low, high, canonize)
    with frozen_parameters(model), _swapped_forwards(model, forwards), torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        output = model(x_in)
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            raise ValueError("model: its output does not depend on x through differentiable layers")
        seeds, multi = _output_relevance(output, target)
        maps = [torch.autograd.grad(output, x_in, seed, retain_graph=i < len(seeds) - 1)[0]
                for i, seed in enumerate(seeds)]
    return torch.stack(maps, dim=1) if multi else maps[0]


def _output_relevance(output, target):
    """(relevance put on the output per target column: ``output * d(score)/d(output)``, whether
    the target has a k axis)."""
    out = output.detach().requires_grad_(True)
    scores = target_scores(out, target)
    columns = [scores] if scores.dim() == 1 else list(scores.unbind(1))
    seeds = [torch.autograd.grad(c.sum(), out, retain_graph=True)[0] * output.detach() for c in columns]
    return seeds, scores.dim() == 2
