"""Gradient attributions: saliency, guided backprop, deconvnet, SmoothGrad, Integrated
Gradients and DeepLIFT, numerically matching Captum (``Saliency``, ``GuidedBackprop``,
``Deconvolution``, ``NoiseTunnel``, ``IntegratedGradients``, ``DeepLift``).

Every method takes any ``nn.Module`` classifier, an input ``x`` [B, C, H, W] (floating point)
and a target (an int, one int per sample, a ``[B, k]`` tensor or a callable ``f(output) -> [B]``,
see ``cnnviz_fast._targets``). Results are ``[B, C, H, W]`` in ``x``'s dtype on ``x``'s device,
or ``[B, k, C, H, W]`` for ``[B, k]`` targets: the forward pass runs once and the k gradients
come from one batched vector-Jacobian product (``is_grads_batched``). Parameter gradients are
never computed (parameters are frozen for the call), no ``.grad`` is filled, the model runs in
eval mode (``_hooks.explaining``) and is left exactly as found: mode, ``requires_grad`` flags, hooks; rules replace the ``forward`` of
nonlinear modules only for the call, also restored when the forward pass raises.

Modified backward rules (guided backprop, deconvnet, DeepLIFT) act on *modules*: a nonlinearity
applied functionally inside a model's ``forward`` (``F.relu``, ``torch.relu``) keeps its plain
gradient, as in Captum. Modules used more than once (torchvision's ``BasicBlock.relu``) and
in-place modules (``ReLU(inplace=True)``) are handled per call.

Every method takes ``compute_dtype=None`` and ``channels_last=None`` (``cnnviz_fast._precision``):
``compute_dtype=torch.bfloat16`` runs the network's body in bfloat16 on a copy converted once
per call, the head (``nn.Linear`` layers), the target scores, the input gradients and the
accumulations over IG steps and SmoothGrad samples in ``x``'s dtype; the result keeps ``x``'s
dtype. Fidelity against float32 (per-map Spearman, top-10% IoU) is measured by
``benchmarks/bench_gradients.py`` and stated in each method's docstring. ``channels_last=None``
(default) or ``True``: on CPU the method runs on a channels-last copy of the model with its
eval-mode batch norms folded into their convolutions (kept while the model is unchanged),
in float32 too, equal to the model's own results to float32 rounding (which at a ReLU kink
may pick the other side, as any two float32 roundings); ``False`` runs the model as given,
rounding as Captum does.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_finite, check_number, check_same_device, check_tensor
from .._hooks import explanation, frozen_parameters, score_gradients
from .._precision import lowered
from .._progress import progress_bar
from .._targets import target_scores
from ..ops import deeplift_rescale_relu_grad

__all__ = ["saliency", "to_map", "guided_backprop", "deconvnet", "smoothgrad",
           "integrated_gradients", "deeplift"]


# ----------------------------------------------------------------------------- plumbing

def _repeat_target(target, batch: int, times: int, interleave: bool):
    """``target`` for ``x`` repeated ``times`` along the batch: block-wise (``x.repeat``, the
    layout of IG's path points and DeepLIFT's [inputs; baselines]) or sample-wise
    (``repeat_interleave``, SmoothGrad's noisy copies)."""
    if callable(target) or isinstance(target, (bool, int)):
        return target
    idx = torch.as_tensor(target)
    if idx.dim() == 0:
        return target
    if idx.dim() not in (1, 2) or idx.shape[0] != batch:
        raise ValueError(f"target: expected an int, {batch} ints or a [{batch}, k] tensor, "
                         f"got shape {tuple(idx.shape)}")
    if interleave:
        return idx.repeat_interleave(times, dim=0)
    return idx.repeat(times, *([1] * (idx.dim() - 1)))


def _rows_of(targets, start, stop):
    """The targets of rows ``start:stop`` of a repeated batch (see ``_repeat_target``)."""
    return targets[start:stop] if isinstance(targets, torch.Tensor) and targets.dim() else targets


def _input_gradients(model, inputs, target):
    """Gradients of the target scores w.r.t. ``inputs`` (one forward pass, parameters frozen):
    ``([N, ...] or [N, k, ...], scores [N] or [N, k])``."""
    with frozen_parameters(model), torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        scores = target_scores(model(inputs), target)
        grads = score_gradients(scores, inputs)
    return grads, scores.detach()


@contextlib.contextmanager
def _replaced_forwards(model, kinds, make_forward):
    """Route the forward of every module of ``kinds`` (exact types, as Captum) through
    ``make_forward(name, module)`` for the block; the original forwards are restored after."""
    saved = []
    try:
        for name, module in model.named_modules():
            if type(module) in kinds:
                saved.append((module, module.__dict__.get("forward")))
                module.forward = make_forward(name, module)
        yield
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _baseline_tensor(baseline, x):
    """``baseline`` as a tensor of x's shape: a number, a tensor of x's shape, or ``[1, C, H, W]``
    / ``[C, H, W]`` broadcast over the batch (Captum's accepted forms)."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(check_number("baseline", baseline)))
    check_tensor("baseline", baseline)
    check_finite("baseline", baseline)
    check_same_device(x=x, baseline=baseline)
    if baseline.dim() == x.dim() - 1:
        baseline = baseline[None]
    if baseline.dim() != x.dim() or baseline.shape[1:] != x.shape[1:] or baseline.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"baseline: expected a number or a tensor of shape {tuple(x.shape)} "
                         f"(or {(1, *x.shape[1:])}), got shape {tuple(baseline.shape)}")
    return baseline.to(x.dtype).expand_as(x)


# Default memory for one chunk of noisy copies / path points on CPU (CUDA: half the free memory).
_CPU_MEMORY_BUDGET = 2 << 30


# Bytes one row saves for the backward, by model and (work, row shape, dtype, device): measured
# once, so repeated calls (one image after another) run every pass at the full chunk size.
_ROW_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_chunks(model, x, rows, batch_size, memory_budget, work):
    """``(start, stop)`` row ranges for pass-by-pass work over ``rows`` rows built from ``x``:
    ``batch_size`` rows each, or as many as fit ``memory_budget`` bytes. A row's cost (the bytes
    autograd saves for the backward, ``saved_tensors_hooks``, weights and buffers not counted,
    times 1.5 for the gradients alive during the backward) is measured on a first one-row pass
    while the caller runs it, and remembered for ``model`` and ``work`` (what a row runs) at
    this row shape; no pass is spent on measuring. No rows (an empty batch) give one empty
    range, so the caller's pass still runs and shapes its (empty) result."""
    if rows == 0:
        yield 0, 0
        return
    if batch_size is not None:
        check_number("batch_size", batch_size, 1, integer=True)
        yield from ((start, min(start + batch_size, rows)) for start in range(0, rows, batch_size))
        return
    if memory_budget is None:
        memory_budget = torch.cuda.mem_get_info(x.device)[0] // 2 if x.is_cuda else _CPU_MEMORY_BUDGET
    else:
        check_number("memory_budget", memory_budget, 1)
    key = (work, tuple(x.shape[1:]), x.dtype, x.device)
    known = _ROW_BYTES.setdefault(model, {})
    first = 0
    if key not in known:
        shared = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
        saved = x[:1].numel() * x.element_size()

        def count(t):
            nonlocal saved
            if t.data_ptr() not in shared:
                saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            yield 0, 1
        known[key], first = saved, 1
    size = max(1, int(memory_budget // (1.5 * known[key])))
    yield from ((start, min(start + size, rows)) for start in range(first, rows, size))


def _sum_features(attr, k_axis):
    """Per-sample (and per-target) sums over C, H, W: [B] or [B, k]."""
    return attr.flatten(2 if k_axis else 1).sum(-1)


# ----------------------------------------------------------------------------- saliency

@explanation
def saliency(model: nn.Module, x: torch.Tensor, target, abs: bool = True, *,
             compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """Input gradient of the target score (Simonyan et al. 2014; Captum ``Saliency``):
    ``|d f_t(x) / dx|`` (``abs=False``: the signed gradient).

    ``x`` float [B, C, H, W]; returns [B, C, H, W] (or [B, k, C, H, W] for [B, k] targets), same
    dtype and device. ``to_map`` reduces it to the per-pixel "gradient magnitude map".
    ``compute_dtype=torch.bfloat16`` (measured against float32, ``bench_gradients.py``, per-map
    Spearman mean / worst, top-10% IoU of ``to_map``): trained default model 0.972 / 0.963, IoU
    0.83; random-weight VGG16 0.85 and ResNet-50 0.90 (IoU 0.5-0.6). The plain gradient is the
    member most sensitive to the body's rounding: bfloat16 is unfit for pixel-level rankings on
    deep networks without batch norm; prefer float32 there, or SmoothGrad.
    """
    model, _ = lowered(model, x, compute_dtype, channels_last)
    grads, _ = _input_gradients(model, x, target)
    return grads.abs() if abs else grads


def to_map(attr: torch.Tensor, reduce: str = "max_abs") -> torch.Tensor:
    """Channel reduction of an attribution [B, C, H, W] -> [B, H, W] (or [B, k, C, H, W] ->
    [B, k, H, W]): ``"max_abs"`` max over channels of |a| (Simonyan et al.'s saliency map),
    ``"sum"`` the signed channel sum (Captum's ``visualize_image_attr`` sign maps), ``"l2"`` the
    Euclidean norm over channels."""
    check_tensor("attr", attr, ndim=(4, 5))
    if reduce == "max_abs":
        return attr.abs().amax(dim=-3)
    if reduce == "sum":
        return attr.sum(dim=-3)
    if reduce == "l2":
        return torch.linalg.vector_norm(attr, dim=-3)
    raise ValueError(f"reduce: expected 'max_abs', 'sum' or 'l2', got {reduce!r}")


# ----------------------------------------------------------------------------- modified ReLU rules

class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients where the input was positive
    (guided backprop: Captum's ``relu(grad_input)``)."""

    @staticmethod
    def forward(ctx, x, inplace):
        out = F.relu(x, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad.clamp_min(0), out, 0), None


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward is the ReLU of the incoming gradient, ignoring the forward mask
    (Zeiler & Fergus deconvnet: Captum's ``relu(grad_output)``)."""

    @staticmethod
    def forward(ctx, x, inplace):
        out = F.relu(x, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0), None


def _modified_relu_gradients(model, x, target, rule, compute_dtype, channels_last):
    model, _ = lowered(model, x, compute_dtype, channels_last)
    def make_forward(_name, module):
        return lambda inp: rule.apply(inp, module.inplace)

    with _replaced_forwards(model, (nn.ReLU,), make_forward):
        grads, _ = _input_gradients(model, x, target)
    return grads


@explanation
def guided_backprop(model: nn.Module, x: torch.Tensor, target, *, compute_dtype: torch.dtype | None = None,
                    channels_last: bool | None = None) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015; Captum ``GuidedBackprop``): the input
    gradient with every ``nn.ReLU`` module's backward replaced by ``relu(grad) * (x > 0)``.

    ``x`` float [B, C, H, W]; returns [B, C, H, W] (or [B, k, C, H, W]), same dtype and device.
    Only ``nn.ReLU`` modules are modified (functional ``F.relu`` is not seen, as in Captum);
    in-place and reused ReLU modules work.
    bfloat16 (``compute_dtype``): Spearman 0.989 (trained default model), 0.998 (VGG16), 0.997
    (ResNet-50, random weights), top-10% IoU 0.93-0.97: the rectified backward is robust to it.
    """
    return _modified_relu_gradients(model, x, target, _GuidedReLU, compute_dtype, channels_last)


@explanation
def deconvnet(model: nn.Module, x: torch.Tensor, target, *, compute_dtype: torch.dtype | None = None,
              channels_last: bool | None = None) -> torch.Tensor:
    """Deconvnet attribution (Zeiler & Fergus 2014; Captum ``Deconvolution``): the input
    gradient with every ``nn.ReLU`` module's backward replaced by ``relu(grad)``.

    ``x`` float [B, C, H, W]; returns [B, C, H, W] (or [B, k, C, H, W]), same dtype and device.
    bfloat16 (``compute_dtype``): Spearman 0.9996 (trained default model), 0.996 (ResNet-50),
    0.948 on random-weight VGG16 (IoU 0.68: unfit there).
    """
    return _modified_relu_gradients(model, x, target, _DeconvReLU, compute_dtype, channels_last)


# ----------------------------------------------------------------------------- SmoothGrad

@explanation
def smoothgrad(model: nn.Module, x: torch.Tensor, target, n_samples: int = 50, noise: float = 0.15,
               method=saliency, generator: torch.Generator | None = None,
               batch_size: int | None = None, memory_budget: int | None = None,
               progress: bool | None = None, *, compute_dtype: torch.dtype | None = None,
               channels_last: bool | None = None) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017; Captum ``NoiseTunnel(method).attribute(nt_type=
    "smoothgrad")``): the mean of ``method(model, x + eps, target)`` over ``n_samples`` noisy
    copies, ``eps ~ N(0, sigma^2)`` with ``sigma = noise * (max(x_b) - min(x_b))`` per sample
    (Smilkov's noise level; Captum's ``stdevs`` is the absolute sigma).

    ``method`` is any attribution of this module with the signature ``(model, x, target)``
    (default ``saliency``, i.e. mean |gradient| as Captum's ``NoiseTunnel(Saliency)``; use
    ``functools.partial(saliency, abs=False)`` for Smilkov's signed mean). The noisy copies are
    laid out as Captum's (copy ``j`` of sample ``b`` is row ``b * n_samples + j``), drawn in one
    ``torch.randn(..., generator=generator)`` on ``x``'s device, so the result does not depend
    on the chunking; with the global generator seeded as Captum's (``torch.manual_seed``) the
    noise is Captum's noise, value for value. ``method`` runs on ``batch_size`` rows at a time
    (``None``: as many as fit ``memory_budget`` bytes, measured on the first row's pass and
    remembered for the model; default
    budget half the free CUDA memory, or 2 GiB on CPU). progress: a tqdm bar of noisy copies on
    stderr; None (default) shows it on an interactive terminal once the work has taken a few
    seconds (``cnnviz_fast._progress``).

    ``x`` float [B, C, H, W]; returns ``method``'s shape per sample ([B, C, H, W] or
    [B, k, C, H, W]), same dtype and device.
    compute_dtype / channels_last, when given, are passed on to ``method`` (every method of
    this module takes them); each noisy copy's ``method`` runs on one converted copy of the model made
    for the call; the mean over samples is taken in ``x``'s dtype. bfloat16 with saliency:
    Spearman 0.997 (trained default model), 0.98 (VGG16), 0.99 (ResNet-50, random weights):
    averaging washes out the rounding the single gradient shows.
    """
    check_number("n_samples", n_samples, 1, integer=True)
    check_number("noise", noise, 0)  # sigma as a fraction of each sample's value range
    if not callable(method):
        raise TypeError(f"method: expected an attribution function (model, x, target) such as "
                        f"cnnviz_fast.saliency, got {method!r}")
    batch = x.shape[0]
    rows = batch * n_samples
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    sigma = (noise * span).repeat_interleave(n_samples)[:, None, None, None]
    targets = _repeat_target(target, batch, n_samples, interleave=True)
    eps = torch.randn((rows, *x.shape[1:]), generator=generator, dtype=x.dtype, device=x.device)
    # the method's converted copy, made once for all chunks (passed on only when asked, so any
    # (model, x, target) callable still works)
    precision = {} if compute_dtype is None and channels_last is None else \
        {"compute_dtype": compute_dtype, "channels_last": channels_last}
    total = None
    with progress_bar(progress, "smoothgrad", rows, "copy") as bar:
        runs, _ = lowered(model, x, compute_dtype, channels_last)
        for start, stop in _row_chunks(runs, x, rows, batch_size, memory_budget, method):
            sample = torch.arange(start, stop, device=x.device) // n_samples
            noisy = x[sample] + eps[start:stop] * sigma[start:stop]
            attr = method(model, noisy, _rows_of(targets, start, stop), **precision)
            if total is None:
                total = attr.new_zeros((batch, *attr.shape[1:]))
            total.index_add_(0, sample, attr)
            bar.update(stop - start)
    return total / n_samples


# ----------------------------------------------------------------------------- Integrated Gradients

def _path_weights(method: str, steps: int):
    """Captum's (step sizes, alphas) for ``method`` (captum.attr._utils.approximation_methods):
    ``riemann_trapezoid``: alphas = linspace(0, 1, n) in float32, step sizes 1/n with the two
    end steps halved (so they sum to 1 - 1/n, as Captum); ``gausslegendre``: Gauss-Legendre
    nodes and weights mapped to [0, 1]."""
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError(f"steps: riemann_trapezoid needs steps >= 2, got {steps}")
        sizes = [1 / steps] * steps
        sizes[0] /= 2
        sizes[-1] /= 2
        return sizes, torch.linspace(0, 1, steps).tolist()
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    raise ValueError(f"method: expected 'riemann_trapezoid' or 'gausslegendre', got {method!r}")


@explanation
def integrated_gradients(model: nn.Module, x: torch.Tensor, target, baseline=0, steps: int = 50,
                         method: str = "riemann_trapezoid", batch_size: int | None = None,
                         memory_budget: int | None = None, return_delta: bool = False,
                         progress: bool | None = None, *, compute_dtype: torch.dtype | None = None,
                         channels_last: bool | None = None):
    """Integrated Gradients (Sundararajan et al. 2017; Captum ``IntegratedGradients``):
    ``(x - x') * sum_i w_i * grad f_t(x' + a_i (x - x'))`` with Captum's step sizes ``w_i`` and
    alphas ``a_i`` for ``method`` (see ``_path_weights``; Captum's own default method is
    ``"gausslegendre"``).

    ``baseline`` x' is a number, a tensor of x's shape, or one [1, C, H, W] baseline for all.
    The ``steps * B`` path points run ``batch_size`` rows per forward/backward pass (Captum's
    ``internal_batch_size``; ``None``: as many as fit ``memory_budget`` bytes, as in
    ``smoothgrad``). ``return_delta=True`` also returns Captum's
    convergence delta ``sum(attr) - (f_t(x) - f_t(x'))`` per sample ([B] or [B, k]). progress: a
    tqdm bar of path points on stderr; None (default) shows it on an interactive terminal once
    the work has taken a few seconds (``cnnviz_fast._progress``).

    compute_dtype: the path points' gradients in the body's precision, the weighted sum over
    steps, the multiplication by ``x - x'`` and the delta in ``x``'s dtype. bfloat16: Spearman
    0.994 (trained default model), 0.94 (ResNet-50) and 0.92 (VGG16, random weights), IoU
    0.66-0.71 there: unfit for random-weight / badly conditioned deep networks.

    ``x`` float [B, C, H, W]; returns [B, C, H, W] (or [B, k, C, H, W]), same dtype and device.
    """
    check_number("steps", steps, 1, integer=True)
    base = _baseline_tensor(baseline, x)
    model, _ = lowered(model, x, compute_dtype, channels_last)
    sizes, alphas = _path_weights(method, steps)
    batch = x.shape[0]
    rows = steps * batch
    diff = x - base
    alpha = torch.tensor(alphas, dtype=torch.float32, device=x.device).to(x.dtype)
    weight = torch.tensor(sizes, dtype=torch.float32, device=x.device).to(x.dtype)
    targets = _repeat_target(target, batch, steps, interleave=False)
    total = None
    with progress_bar(progress, "integrated_gradients", rows, "point") as bar:
        for start, stop in _row_chunks(model, x, rows, batch_size, memory_budget, "gradient"):
            row = torch.arange(start, stop, device=x.device)
            step, sample = row // batch, row % batch
            path = base[sample] + alpha[step].view(-1, 1, 1, 1) * diff[sample]
            grads, _ = _input_gradients(model, path, _rows_of(targets, start, stop))
            grads = grads * weight[step].view(-1, *([1] * (grads.dim() - 1)))
            if total is None:
                total = grads.new_zeros((batch, *grads.shape[1:]))
            total.index_add_(0, sample, grads)
            bar.update(stop - start)
    k_axis = total.dim() == 5
    attr = total * (diff[:, None] if k_axis else diff)
    if not return_delta:
        return attr
    with frozen_parameters(model), torch.no_grad():
        ends = target_scores(model(torch.cat([x, base])), _repeat_target(target, batch, 2, interleave=False))
    return attr, _sum_features(attr, k_axis) - (ends[:batch] - ends[batch:])


# ----------------------------------------------------------------------------- DeepLIFT

# Captum's SUPPORTED_NON_LINEAR (captum/attr/_core/deep_lift.py), matched by exact type.
_RESCALE_TYPES = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
_MAXPOOL_TYPES = (nn.MaxPool2d, nn.MaxPool3d)


class _Link:
    """One rule-module call's output as seen by a rule module that takes it directly as input.

    Captum hooks the output tensor of a nonlinear module A (to record its output gradient)
    before the next nonlinear module B hooks the same tensor as its input (to replace the
    gradient by B's rule), so A's rule reads the gradient *before* B's rule: B's plain input
    gradient (``plain``). B's rule result still flows into A's plain derivative where A falls
    back to it (A's positions with ``|x - x'| < eps``). We reproduce this, e.g. ReLU ->
    MaxPool in alexnet, VGG and ResNet stems, so the numbers are Captum's.
    """
    __slots__ = ("out", "plain")

    def __init__(self):
        self.out = self.plain = None


class _RescaleRule(torch.autograd.Function):
    """DeepLIFT rescale rule on an elementwise nonlinearity over the [inputs; references]
    batch (Captum's ``nonlinear``): the backward multiplies by ``(f(x) - f(x')) / (x - x')``,
    or by the plain derivative ``f'`` where ``|x - x'| < eps``. ReLU (``fn=None``) saves only
    its input and computes the multiplier inside the backward's one pass
    (``cnnviz_fast.ops.deeplift_rescale_relu_grad``), so it costs what a ReLU's gradient costs."""

    @staticmethod
    def forward(ctx, x, fn, eps, up, link):
        ctx.eps, ctx.up, ctx.link, ctx.relu = eps, up, link, fn is None
        if fn is None:
            ctx.save_for_backward(x)
            return F.relu(x)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = fn(leaf)
            (slope,) = torch.autograd.grad(out.sum(), leaf)
        out = out.detach()
        x_in, x_ref = x.chunk(2)
        o_in, o_ref = out.chunk(2)
        fallback = (x_in - x_ref).abs() < eps
        ratio = (o_in - o_ref) / (x_in - x_ref)
        s_in, s_ref = slope.chunk(2)
        factor = torch.cat([torch.where(fallback, s_in, ratio), torch.where(fallback, s_ref, ratio)])
        ctx.save_for_backward(factor, fallback, slope if up is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        link, up = ctx.link, ctx.up
        if ctx.relu:
            (x,) = ctx.saved_tensors
            x_in, x_ref = x.chunk(2)
            fallback = (x_in - x_ref).abs() < ctx.eps if link.plain is not None else None
            slope = (x > 0).to(x.dtype) if up is not None else None
        else:
            factor, fallback, slope = ctx.saved_tensors
        if link.plain is not None:  # a rule module read this output: its plain gradient, ours at ties
            grad_in = torch.where(torch.cat([fallback, fallback]), grad, link.plain)
            link.plain = None
        else:
            grad_in = grad
        if ctx.relu:  # [B, k] targets backprop under vmap (is_grads_batched): the torch reference runs there
            functorch = torch._C._functorch
            batched = functorch.is_legacy_batchedtensor(grad_in) or functorch.is_batchedtensor(grad_in)
            # the C++ kernel takes float32/float64 numpy arrays: bfloat16 bodies run the reference
            lowp = x.dtype not in (torch.float32, torch.float64) and not x.is_cuda
            result = deeplift_rescale_relu_grad(grad_in, x, ctx.eps, backend="reference" if batched or lowp else None)
        else:
            result = grad_in * factor
        if up is not None:
            up.plain = grad * slope
        return result, None, None, None, None


def _pool_args(module, dims):
    def tup(v):
        return (v,) * dims if isinstance(v, int) else tuple(v)
    stride = module.stride if module.stride is not None else module.kernel_size
    return tup(module.kernel_size), tup(stride), tup(module.padding), tup(module.dilation)


class _MaxPoolRule(torch.autograd.Function):
    """DeepLIFT on max pooling as Captum's ``maxpool``: output differences split at the cross
    maximum ``m = max(y, y')`` into ``(m - y')`` routed to the inputs' argmax and ``(y - m)``
    to the references' argmax (``max_unpool``, as Captum: with overlapping windows a position
    keeps one window's share), summed and divided by ``x - x'``; the plain max-pool gradient
    where ``|x - x'| < eps`` (Captum takes sample 0's there, we take each sample's own)."""

    @staticmethod
    def forward(ctx, x, module, eps, up, link):
        dims = x.dim() - 2
        kernel, stride, padding, dilation = _pool_args(module, dims)
        pool = F.max_pool2d if dims == 2 else F.max_pool3d
        out, idx = pool(x, kernel, stride, padding, dilation, module.ceil_mode, True)
        o_in, o_ref = out.chunk(2)
        cross = torch.max(o_in, o_ref)
        x_in, x_ref = x.chunk(2)
        ctx.save_for_backward(x, idx, torch.cat([cross - o_ref, o_in - cross]), x_in - x_ref)
        ctx.args, ctx.ceil_mode, ctx.eps = (kernel, stride, padding, dilation), module.ceil_mode, eps
        ctx.up, ctx.link = up, link
        return out

    @staticmethod
    def backward(ctx, grad):
        x, idx, d_out, d_in = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.args
        link, up = ctx.link, ctx.up
        if x.dim() == 4:
            unpool, pool_backward = F.max_unpool2d, torch.ops.aten.max_pool2d_with_indices_backward
        else:
            unpool, pool_backward = F.max_unpool3d, torch.ops.aten.max_pool3d_with_indices_backward
        rule_grad = grad if link.plain is None else link.plain
        link.plain = None
        u_in, u_ref = unpool(rule_grad * d_out, idx, kernel, stride, padding, list(x.shape)).chunk(2)
        routed = (u_in + u_ref) / d_in
        plain = pool_backward(grad, x, kernel, stride, padding, dilation, ctx.ceil_mode, idx)
        if up is not None:
            up.plain = plain
        fallback = d_in.abs() < ctx.eps
        p_in, p_ref = plain.chunk(2)
        return (torch.cat([torch.where(fallback, p_in, routed), torch.where(fallback, p_ref, routed)]),
                None, None, None, None)


@contextlib.contextmanager
def _deeplift_rules(model, eps):
    """Route every supported nonlinear module through its DeepLIFT rule for the block."""
    links = {}

    def make_forward(name, module):
        if type(module) in _MAXPOOL_TYPES:
            if module.return_indices:
                raise ValueError(f"deeplift: layer {name!r} returns pooling indices, which DeepLIFT does not cover")
            rule, arg = _MaxPoolRule, module
        elif type(module) is nn.ReLU:
            rule, arg = _RescaleRule, None
        else:
            rule = _RescaleRule
            forward = type(module).forward.__get__(module)
            arg = (lambda t: forward(t.clone())) if getattr(module, "inplace", False) else forward

        def rule_forward(inp):
            up = links.get(id(inp))
            if up is not None and up.out is not inp:
                up = None
            link = _Link()
            link.out = rule.apply(inp, arg, eps, up, link)
            links[id(link.out)] = link
            return link.out
        return rule_forward

    for name, module in model.named_modules():
        if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.MaxPool1d)):
            raise ValueError(f"deeplift: layer {name!r} ({type(module).__name__}) has no rule here; "
                             f"attribute the logits of a model of 2-D/3-D max pools")
    with _replaced_forwards(model, _RESCALE_TYPES + _MAXPOOL_TYPES, make_forward):
        yield links


@explanation
def deeplift(model: nn.Module, x: torch.Tensor, target, baseline=0, return_delta: bool = False,
             eps: float = 1e-10, *, compute_dtype: torch.dtype | None = None,
             channels_last: bool | None = None):
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017, Ancona et al. 2018; Captum
    ``DeepLift`` with ``multiply_by_inputs=True``): ``(x - x') * m`` where the multipliers ``m``
    are the gradient of ``f_t`` with each nonlinear module's local derivative replaced by its
    difference quotient against the reference ``x'``.

    One forward pass over the stacked batch ``[x; x']`` (2B rows, as Captum) and one backward
    from both halves' target scores. Rules, by exact module type as Captum: the rescale rule on
    ``ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus`` (on ReLU one fused backward
    pass, ``cnnviz_fast.ops.deeplift_rescale_relu_grad``); Captum's max-pool rule on ``MaxPool2d``
    / ``MaxPool3d`` (``_MaxPoolRule``), with Captum's ordering between a nonlinear module and
    the next one reading its output (``_Link``); linear layers (conv, linear, batch norm in
    eval, average pooling, additions) keep their gradient, which is their DeepLIFT multiplier.
    Other modules and functional nonlinearities keep plain gradients, as in Captum; Softmax,
    LogSoftmax and MaxPool1d modules raise. Unlike Captum, modules used more than once
    (torchvision's ``BasicBlock.relu``) work, as do in-place ones.

    ``baseline`` as in ``integrated_gradients``. ``return_delta=True`` also returns the
    summation-to-delta error ``sum(attr) - (f_t(x) - f_t(x'))`` per sample ([B] or [B, k]).
    compute_dtype: the rules run on the body's precision (the ReLU rule by the reference
    kernel in bfloat16 on CPU), the multiplication by ``x - x'`` in ``x``'s dtype. bfloat16:
    Spearman 0.994 (trained default model) but 0.89 (ResNet-50) and 0.86 (VGG16, random
    weights): difference quotients of nearly equal bfloat16 activations lose their digits on
    deep networks, so bfloat16 is unfit there; the delta grows accordingly.

    ``x`` float [B, C, H, W]; returns [B, C, H, W] (or [B, k, C, H, W]), same dtype and device.
    """
    eps = float(check_number("eps", eps, 0))
    base = _baseline_tensor(baseline, x)
    model, _ = lowered(model, x, compute_dtype, channels_last)
    batch = x.shape[0]
    with _deeplift_rules(model, eps) as links, frozen_parameters(model), torch.enable_grad():
        stacked = torch.cat([x, base]).requires_grad_(True)
        scores = target_scores(model(stacked), _repeat_target(target, batch, 2, interleave=False))
        for link in links.values():  # the backward needs no outputs: do not keep them alive
            link.out = None
        links.clear()
        grads = score_gradients(scores, stacked)
    k_axis = grads.dim() == 5
    diff = x - base
    attr = grads[:batch] * (diff[:, None] if k_axis else diff)
    if not return_delta:
        return attr
    scores = scores.detach()
    return attr, _sum_features(attr, k_axis) - (scores[:batch] - scores[batch:])
