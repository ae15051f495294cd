"""The CAM family: CAM, Grad-CAM, Grad-CAM++, LayerCAM and Score-CAM on one fused kernel.

Every method reduces to channel (or per-position) weights for the activations ``A [B, K, h, w]``
of one layer; ``cnnviz_fast.ops.cam_combine`` then forms ``relu(sum_c w_c A_c)``, resizes it
bilinearly to ``size`` and min-max normalizes it in one pass. Targets are an int, one int per
sample, or a ``[B, k]`` tensor of k classes per sample (the result gains a k axis and the
model body still runs once). Common keywords: ``relu=True``, ``normalize=True`` (each map to
[0, 1]), ``size="input"`` (the input's ``(H, W)``; ``None`` keeps ``(h, w)``; or an int / pair),
``backend=None`` (see ``cnnviz_fast.backends()``). Results are ``[B, H, W]`` or
``[B, k, H, W]`` of the input's dtype on the input's device. The model is explained in eval
mode and left as found.

``compute_dtype=None`` / ``channels_last=None`` (every method; ``cnnviz_fast._precision``;
``channels_last=None`` (default) or ``True``: on CPU the method runs on a channels-last copy
of the model with its eval-mode batch norms folded into their convolutions (the explained
layer's own output kept), in float32 too, equal to the model's own maps to float32 rounding;
``False`` runs the model as given, rounding as the peers do):
``compute_dtype=torch.bfloat16`` runs the network's body in bfloat16 on a copy converted once
per call; the head (``nn.Linear``), the target scores, and the layer's activations and
gradients as ``cam_combine`` weighs them are in ``x``'s dtype. Fidelity against float32 is
measured by ``benchmarks/bench_cam.py``.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from .._hooks import capture, explanation, frozen_parameters, layer_name, resolve_layer, score_gradients
from .._precision import lowered
from .._progress import progress_bar
from .._targets import target_indices, target_scores
from ..ops import cam_combine, upsample_normalize

# Score-CAM's masked inputs per chunk come from this budget (bytes; CNNVIZ_SCORE_CAM_BUDGET_MB
# overrides): one masked input costs its own size plus the no-grad forward's live activations,
# bounded by _FORWARD_FACTOR times the input size (ResNet-50 at 224: conv1's output is 5.3x).
SCORE_CAM_BUDGET_BYTES = 512 * 2**20
_FORWARD_FACTOR = 16

# pytorch-grad-cam's epsilon in the Grad-CAM++ alpha denominator.
_GRAD_CAM_PP_EPS = 1e-6


def _out_size(size, x):
    return tuple(x.shape[-2:]) if isinstance(size, str) and size == "input" else size


def _layer_output(record, module, model):
    acts = record.get(module)
    if acts is None:
        raise ValueError(f"layer: {layer_name(model, module)!r} did not run in the forward pass")
    if acts.dim() != 4:
        raise ValueError(f"layer: {layer_name(model, module)!r} gives a {acts.dim()}-D output of shape "
                         f"{tuple(acts.shape)}; CAM methods need 4-D [B, K, h, w] activations")
    return acts


def _last_linear(model: nn.Module, fc=None):
    if fc is not None:
        fc = resolve_layer(model, fc)
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"fc: expected an nn.Linear, got {type(fc).__name__}")
        return fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@contextlib.contextmanager
def _record_head(fc):
    """Record fc's input and output during the forward pass (nothing when fc is None)."""
    io = {}
    if fc is None:
        yield io
        return

    def hook(_module, inputs, output):
        io["input"], io["output"] = inputs[0], output

    handle = fc.register_forward_hook(hook)
    try:
        yield io
    finally:
        handle.remove()


def _is_gap_linear(acts, head, output) -> bool:
    """True when the model ends ``fc(mean of acts over space)``: fc's output is the model's
    output and fc's input equals the spatial mean of ``acts`` (checked by value)."""
    if head.get("output") is not output:
        return False
    fc_in = head["input"].detach()
    pooled = acts.detach().mean((2, 3)).to(fc_in.dtype)
    if fc_in.shape != pooled.shape:
        return False
    # a lower-precision body (compute_dtype) pools with its own rounding
    rtol = max(1e-4, 4 * torch.finfo(acts.dtype).eps)
    tol = rtol / 10 * (float(pooled.abs().max()) if pooled.numel() else 0.0) + 1e-30
    return bool(torch.allclose(fc_in, pooled, rtol=rtol, atol=tol))


def _gradients(model, x, module, target, fc):
    """Activations ``[B, K, h, w]`` and target gradients ``[B, (k,) K, h, w]`` of ``module``.

    One forward pass with parameter gradients off. On a GAP + linear head the gradients are
    closed form, ``fc.weight[target] / (h w)`` at every position (an expanded view, no
    backward pass); otherwise one (batched) vector-Jacobian product from the scores to the
    layer only.
    """
    with frozen_parameters(model), capture(model, module, grad_leaf=True) as record, \
            _record_head(fc) as head, torch.enable_grad():
        output = model(x)
        acts = _layer_output(record, module, model)
        if not callable(target) and _is_gap_linear(acts, head, output):
            idx = target_indices(target, x.shape[0], output.shape[1], x.device)
            rows = fc.weight.detach()[idx].to(x.dtype) / (acts.shape[2] * acts.shape[3])
            grads = rows[..., None, None].expand(*rows.shape, *acts.shape[2:])
        else:
            grads = score_gradients(target_scores(output, target), acts)
    return acts.detach().to(x.dtype), grads.detach().to(x.dtype)


def _layer_gradients(model, x, layer, target, compute_dtype, channels_last):
    """``_gradients`` of ``layer`` on the model that runs (``_precision.lowered``)."""
    module = resolve_layer(model, layer)
    runs, counterpart = lowered(model, x, compute_dtype, channels_last, keep=(module,))
    return _gradients(runs, x, counterpart(module), target, _last_linear(runs))


@explanation
def cam(model: nn.Module, x: torch.Tensor, target, layer=None, fc=None, relu: bool = True,
        normalize: bool = True, size="input", backend: str | None = None, *,
        compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """CAM (Zhou et al. 2016) for models ending ``layer -> global average pool -> fc``.

    ``map = relu(sum_c fc.weight[target, c] A_c)``, as torchcam's ``CAM`` (bias left out;
    torchcam applies no ReLU, so ``relu=False`` matches it). One forward pass, no gradients.
    fc: the head (module or name); default the model's last ``nn.Linear``. layer: default the
    outermost module whose output is average-pooled into fc (found with one extra forward
    pass). The head is checked by value (fc's input equals the spatial mean of the layer's
    output and fc's output is the model's output); a model without one raises ``ValueError``
    (use ``grad_cam``, equal to CAM up to scale on such heads).
    bfloat16 (``compute_dtype``; the head's weights stay in ``x``'s dtype): Spearman 0.999 on
    the trained default model and on random-weight ResNet-50.
    x: ``[B, C, H, W]``; target: int, ``[B]`` or ``[B, k]`` class indices.
    """
    fc = _last_linear(model, fc)
    if fc is None:
        raise ValueError(f"cam: {type(model).__name__} has no nn.Linear head; CAM needs a global "
                         "average pool followed by a linear layer (use grad_cam instead)")
    if callable(target):
        raise TypeError("target: cam takes class indices, not a callable (use grad_cam)")
    module = None if layer is None else resolve_layer(model, layer)
    runs, counterpart = lowered(model, x, compute_dtype, channels_last, keep=() if module is None else (module,))
    fc = counterpart(fc)
    module = _gap_layer(runs, x, fc) if module is None else counterpart(module)
    with torch.no_grad(), capture(runs, module) as record, _record_head(fc) as head:
        output = runs(x)
    acts = _layer_output(record, module, runs)
    if not _is_gap_linear(acts, head, output):
        raise ValueError(f"cam: the output of layer {layer_name(runs, module)!r} is not global-average-"
                         f"pooled into fc {layer_name(runs, fc)!r} giving the model's output; CAM "
                         "needs a GAP + linear head (use grad_cam)")
    idx = target_indices(target, x.shape[0], output.shape[1], x.device)
    return cam_combine(acts.to(x.dtype), fc.weight.detach()[idx], _out_size(size, x), relu, normalize, backend)


def _gap_layer(model, x, fc):
    """The module whose 4-D output (larger than 1x1, which skips the pool itself) is
    average-pooled into fc: the last such hook to fire, so the outermost container."""
    fired = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: fired.append((mod, out)))
             for m in model.modules() if m is not model]
    try:
        with torch.no_grad(), _record_head(fc) as head:
            output = model(x)
    finally:
        for h in hooks:
            h.remove()
    for module, out in reversed(fired):
        spatial = isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1
        if spatial and _is_gap_linear(out, head, output):
            return module
    raise ValueError(f"cam: found no layer of {type(model).__name__} whose global average pool feeds "
                     f"fc {layer_name(model, fc)!r} and gives the model's output; pass layer= or use grad_cam")


@explanation
def grad_cam(model: nn.Module, x: torch.Tensor, target, layer, relu: bool = True,
             normalize: bool = True, size="input", backend: str | None = None, *,
             compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``map = relu(sum_c w_c A_c)`` with
    ``w_c = mean_{y,x} dY_target / dA_c(y, x)``, as pytorch-grad-cam's ``GradCAM``, torchcam's
    ``GradCAM`` and Captum's ``LayerGradCam(relu_attributions=True)`` (+
    ``LayerAttribution.interpolate(..., "bilinear")``) compute it.

    Cost: one forward pass (parameter gradients off); on a GAP + linear head the weights are
    closed form (``fc.weight[target] / (h w)``), so k classes cost no backward pass at all;
    otherwise one batched vector-Jacobian product from the scores to ``layer`` only.
    x: ``[B, C, H, W]``; target: int, ``[B]``, ``[B, k]`` class indices or a callable
    ``output -> [B]`` scores; layer: module or dotted name with a 4-D output.
    ``compute_dtype=torch.bfloat16`` (``bench_cam.py``; per-map Spearman against float32):
    0.999 on the trained default model and on random-weight ResNet-50, but 0.89 (worst map
    0.81, top-10% IoU 0.70) on random-weight VGG16 at ``features.29``, whose channel weights
    (means of gradients that nearly cancel) lose their signs in bfloat16: unfit there;
    Grad-CAM++ and LayerCAM, which rectify the gradients first, stay at 0.999.
    """
    acts, grads = _layer_gradients(model, x, layer, target, compute_dtype, channels_last)
    return cam_combine(acts, grads.mean((-2, -1)), _out_size(size, x), relu, normalize, backend)


@explanation
def grad_cam_pp(model: nn.Module, x: torch.Tensor, target, layer, relu: bool = True,
                normalize: bool = True, size="input", backend: str | None = None, *,
                compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) as pytorch-grad-cam's ``GradCAMPlusPlus``:
    ``alpha = g^2 / (2 g^2 + (sum_{y,x} A_c) g^3 + 1e-6)`` (0 where ``g == 0``),
    ``w_c = sum_{y,x} alpha * relu(g)``, ``map = relu(sum_c w_c A_c)``, with ``g`` the target's
    gradient at the layer. This closed form of the higher derivatives is exact only when the
    score is an exponential of the logit (pytorch-grad-cam issue 369); like pytorch-grad-cam we
    apply it to the logit's gradient. torchcam's ``GradCAMpp`` differs (it sums ``A g^3`` in
    the denominator and, in torchcam 0.5, its in-place division on a masked copy leaves
    ``alpha = g^2``). Arguments, cost and shapes as ``grad_cam``.
    bfloat16 (``compute_dtype``): Spearman 0.999 on the trained default model and on random
    VGG16 / ResNet-50.
    """
    acts, grads = _layer_gradients(model, x, layer, target, compute_dtype, channels_last)
    return cam_combine(acts, _grad_cam_pp_weights(acts, grads), _out_size(size, x), relu, normalize, backend)


def _grad_cam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s channel weights ``[B, (k,) K]`` from activations ``[B, K, h, w]`` and target
    gradients ``[B, (k,) K, h, w]`` (see ``grad_cam_pp``)."""
    sum_acts = acts.sum((2, 3))
    sum_acts = (sum_acts if grads.dim() == 4 else sum_acts[:, None])[..., None, None]
    g2 = grads * grads
    alpha = g2 / (2 * g2 + sum_acts * g2 * grads + _GRAD_CAM_PP_EPS)
    alpha = torch.where(grads != 0, alpha, 0)
    return (alpha * torch.relu(grads)).sum((-2, -1))


@explanation
def layer_cam(model: nn.Module, x: torch.Tensor, target, layer, relu: bool = True,
              normalize: bool = True, size="input", backend: str | None = None, *,
              compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): per-position weights ``relu(g)``,
    ``map = relu(sum_c relu(g_c(y, x)) A_c(y, x))``, as pytorch-grad-cam's ``LayerCAM`` and
    torchcam's ``LayerCAM`` (one layer, so no multi-layer fusion) compute it. Arguments, cost
    and shapes as ``grad_cam``.
    bfloat16 (``compute_dtype``): Spearman 0.996 on the trained default model, 0.999 on
    random VGG16 / ResNet-50.
    """
    acts, grads = _layer_gradients(model, x, layer, target, compute_dtype, channels_last)
    return cam_combine(acts, torch.relu(grads), _out_size(size, x), relu, normalize, backend)


def _score_cam_chunk(x: torch.Tensor, batch_size) -> int:
    if batch_size is not None:
        return check_number("batch_size", batch_size, 1, integer=True)
    budget = float(os.environ.get("CNNVIZ_SCORE_CAM_BUDGET_MB", 0)) * 2**20 or SCORE_CAM_BUDGET_BYTES
    per_input = _FORWARD_FACTOR * x.shape[1:].numel() * x.element_size()
    return max(1, int(budget // per_input))


@explanation
def score_cam(model: nn.Module, x: torch.Tensor, target, layer, batch_size: int | None = None,
              relu: bool = True, normalize: bool = True, size="input",
              backend: str | None = None, progress: bool | None = None, *,
              compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): each activation map ``A_c`` is bilinearly upsampled to the
    input size and min-max normalized to a mask ``M_c``; the model scores ``x * M_c``; the
    weights are the softmax over channels of the target's masked-input logits,
    ``w = softmax_c(Y_target(x * M_c))``, and ``map = relu(sum_c w_c A_c)``.

    As torchcam's ``ScoreCAM`` and pytorch-grad-cam's ``ScoreCAM`` (softmax over channels of
    the target logit; subtracting a baseline score, as torchcam does, leaves a softmax
    unchanged). Masks are upsampled then normalized (the paper's and pytorch-grad-cam's order;
    torchcam normalizes before upsampling) with ``align_corners=False`` (torchcam;
    pytorch-grad-cam uses ``align_corners=True``).
    The ``B * K`` masked inputs are built on the input's device in chunks of ``batch_size``
    (default: ``SCORE_CAM_BUDGET_BYTES`` (512 MiB, or ``CNNVIZ_SCORE_CAM_BUDGET_MB``) divided by
    16x the size of one input image, a bound on a masked input plus its forward's live
    activations); each chunk is one forward pass, and every target class of a ``[B, k]``
    target is scored from it. target: int, ``[B]`` or ``[B, k]`` class indices, or a callable
    ``output -> [n]`` scores (applied to each chunk's output). progress: a tqdm bar of masked
    inputs on stderr; None (default) shows it on an interactive terminal once the work has
    taken a few seconds (``cnnviz_fast._progress``).
    compute_dtype: the masked forward passes' body in that precision, their scores from the
    head in ``x``'s dtype, the softmax in float32. bfloat16: Spearman 0.996 mean, 0.95 worst
    map on the trained default model (not measured on VGG16 / ResNet-50: 512 / 2048 masked
    passes per image).
    """
    module = resolve_layer(model, layer)
    chunk = _score_cam_chunk(x, batch_size)
    model, counterpart = lowered(model, x, compute_dtype, channels_last, keep=(module,))
    module = counterpart(module)
    with torch.no_grad(), capture(model, module) as record:
        output = model(x)
    acts = _layer_output(record, module, model).to(x.dtype)
    B, K = acts.shape[:2]
    idx = None if callable(target) else target_indices(target, B, output.shape[1], x.device)
    pairs = acts.reshape(B * K, 1, *acts.shape[2:])
    scores = []
    with torch.no_grad(), progress_bar(progress, "score_cam", B * K, "mask") as bar:
        for start in range(0, B * K, chunk):
            sample = torch.arange(start, min(start + chunk, B * K), device=x.device) // K
            masks = upsample_normalize(pairs[start:start + chunk], tuple(x.shape[-2:]), backend=backend)
            out = model(x[sample] * masks)
            scores.append(target_scores(out, target) if idx is None else
                          out.gather(1, idx[sample].view(len(sample), -1)))
            bar.update(len(sample))
    k = 1 if idx is None or idx.dim() == 1 else idx.shape[1]
    scores = (torch.cat(scores) if scores else output.new_empty(0)).view(B, K, k).transpose(1, 2)
    weights = F.softmax(scores.float(), dim=-1).to(acts.dtype)
    if idx is None or idx.dim() == 1:
        weights = weights.squeeze(1)
    return cam_combine(acts, weights, _out_size(size, x), relu, normalize, backend)
