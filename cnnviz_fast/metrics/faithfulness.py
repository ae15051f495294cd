"""Faithfulness metrics: how the model's score falls as the most relevant features are removed.

Every perturbed input is written on the input's device by ``ops.perturb_by_rank`` and all
steps of all images are streamed through the model in chunks sized from ``memory_budget``
bytes (default half the free GPU memory, 1 GiB on CPU; ``batch_size`` copies per forward pass
overrides it). Results do not depend on either (to float32 rounding of the model). ``model``
must be in eval mode and is not changed; ``target`` is an int or one class per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ._engine import (baseline_tensor, blur, check_attributions, check_input, check_int, check_model,
                      descending_ranks, repeat_target, step_scores)

_ORDERS = ("morf", "lerf")


def _prepare(model, x, attributions, name="attributions"):
    check_input(x)
    check_model(model, x)
    return check_attributions(name, attributions, x)


def pixel_flipping(model, x, target, attributions, *, features_in_step: int = 1, baseline=0.0,
                   softmax: bool = True, memory_budget=None, batch_size=None, backend=None,
                   compute_dtype=None, channels_last=None) -> torch.Tensor:
    """Pixel flipping (Bach et al. 2015): the target's score as features are removed, most
    relevant first.

    x: float ``[B, C, H, W]``; attributions ``[B, H, W]`` count pixels (all channels of a pixel
    are replaced together) or ``[B, C, H, W]`` count elements; ``features_in_step`` features
    are replaced per step (it must divide their number). baseline: a float, a tensor
    broadcastable to x, ``"mean"`` (each image's mean), ``"black"``/``"white"`` (each image's
    min/max, as Quantus) or ``"blur"``. softmax: score probabilities rather than logits.
    compute_dtype / channels_last: as the explanation methods' (``cnnviz_fast._precision``): by
    default the copies run on a channels-last copy of the model with its batch norms folded
    into their convolutions on CPU (the default model's forward 1.35x faster; scores equal to
    float32 rounding), ``channels_last=False`` runs the model as given, ``compute_dtype=
    torch.bfloat16`` its body in bfloat16 with the head and the scores in x's dtype.
    Returns ``[B, steps]`` (steps = features / features_in_step): the score after each step,
    on x's device.

    Equals Quantus 0.6 ``PixelFlipping(features_in_step=k, perturb_baseline=b)`` called with
    ``softmax=softmax``: exactly for ``[B, C, H, W]`` attributions; for ``[B, H, W]`` ones, as
    Quantus with ``[B, 1, H, W]`` attributions and ``features_in_step = C * k`` (Quantus
    broadcasts them over channels and flips one element at a time). Documented differences:
    ties of attribution keep index order (Quantus' unstable quicksort breaks them at random);
    ``"mean"`` is the clean image's mean (Quantus recomputes it on the partly perturbed image
    at every step, so its baseline drifts with the step size).
    """
    attributions = _prepare(model, x, attributions)
    features = attributions[0].numel()
    check_int("features_in_step", features_in_step)
    if features % features_in_step:
        raise ValueError(f"features_in_step: {features_in_step} does not divide the {features} features "
                         f"of attributions {list(attributions.shape[1:])}")
    steps = range(1, features // features_in_step + 1)
    return step_scores(model, x, target, descending_ranks(attributions), steps, features_in_step,
                       baseline_tensor(baseline, x), softmax, memory_budget, batch_size, backend,
                       compute_dtype, channels_last)


def _region_ranks(attributions, patch_size: int, order: str) -> tuple[torch.Tensor, int]:
    """Each pixel's region rank ``[B, H, W]`` and the number of regions. Regions tile the image
    as Quantus tiles it: a grid of ``patch_size`` squares centred on the image when the size
    is not a multiple (Quantus pads ``floor`` before and ``ceil`` after), clipped at the border."""
    a = attributions if attributions.dim() == 3 else attributions.sum(1)
    H, W = a.shape[-2:]
    pad = [((-n) % patch_size) // 2 for n in (H, W)]
    rows = (torch.arange(H, device=a.device) + pad[0]) // patch_size
    cols = (torch.arange(W, device=a.device) + pad[1]) // patch_size
    n_cols = int(cols[-1]) + 1
    region = rows[:, None] * n_cols + cols[None, :]  # [H, W] region id
    n_regions = (int(rows[-1]) + 1) * n_cols
    sums = torch.zeros(a.shape[0], n_regions, dtype=torch.float64, device=a.device)
    sums.index_add_(1, region.flatten(), a.flatten(1).double())
    region_rank = descending_ranks(sums if order == "morf" else -sums)
    return region_rank[:, region], n_regions


def region_perturbation(model, x, target, attributions, *, patch_size: int = 8, order: str = "morf",
                        regions: int = 100, baseline=0.0, softmax: bool = True, memory_budget=None,
                        batch_size=None, backend=None, compute_dtype=None, channels_last=None) -> torch.Tensor:
    """Region perturbation (Samek et al. 2017, "Evaluating the visualization of what a deep
    neural network has learned"): square regions removed in order of their summed attribution.

    Arguments as ``pixel_flipping``; regions are ``patch_size`` squares over all channels,
    ``order`` ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first); the first
    ``regions`` of them (at most all) are removed cumulatively. Returns ``[B, regions]``: the
    clean score minus the score after each step (a drop; AUC by ``auc``).

    Equals Quantus 0.6 ``RegionPerturbation(patch_size=p, order=o, regions_evaluation=r,
    perturb_baseline=b)`` called with ``softmax=softmax`` (its centred padding reproduced).
    Differences as ``pixel_flipping``; Quantus' ``order="random"`` is not offered.
    """
    attributions = _prepare(model, x, attributions)
    check_int("patch_size", patch_size)
    check_int("regions", regions)
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {_ORDERS}, got {order!r}")
    ranks, n_regions = _region_ranks(attributions, patch_size, order)
    steps = range(0, min(regions, n_regions) + 1)
    scores = step_scores(model, x, target, ranks, steps, 1, baseline_tensor(baseline, x), softmax,
                         memory_budget, batch_size, backend, compute_dtype, channels_last)
    return scores[:, :1] - scores[:, 1:]


def _resized_saliency(saliency, x):
    check_tensor("saliency", saliency, ndim=3)
    if saliency.shape[0] != x.shape[0]:
        raise ValueError(f"saliency: expected {x.shape[0]} maps to match x, got shape {list(saliency.shape)}")
    check_attributions("saliency", saliency)
    if tuple(saliency.shape[1:]) != tuple(x.shape[2:]):
        saliency = F.interpolate(saliency[:, None].to(x.dtype), size=x.shape[2:], mode="bilinear",
                                 align_corners=False)[:, 0]
    return saliency.to(x.device)


def _causal(model, x, target, saliency, steps, start, finish, softmax, *engine):
    check_input(x)
    check_model(model, x)
    saliency = _resized_saliency(saliency, x)
    check_int("steps", steps)
    H, W = x.shape[2:]
    per_step = -(-H * W // steps)
    curves = step_scores(model, start, target, descending_ranks(saliency), range(0, steps + 1), per_step,
                         finish, softmax, *engine)
    return curves, auc(curves, dx=1.0 / steps)


def deletion(model, x, target, saliency, *, steps: int = 100, baseline=0.0, softmax: bool = True,
             memory_budget=None, batch_size=None, backend=None, compute_dtype=None, channels_last=None):
    """Deletion (Petsiuk et al. 2018, RISE): the score as the most salient pixels are set to the
    baseline, ``ceil(H * W / steps)`` pixels per step.

    saliency: ``[B, h, w]`` maps of any resolution (bilinearly resized to x's). Returns
    ``(curves [B, steps + 1], auc [B])``: the score at 0, 1, ..., steps steps (the first is the
    clean image) and the trapezoid area over the removed fraction in [0, 1] (lower is better).
    Equals RISE's ``CausalMetric('del', step, torch.zeros_like)`` with ``step = ceil(H*W/steps)``
    and the target class instead of the top-1 class; ``baseline`` and the rest as ``pixel_flipping``.
    """
    check_input(x)
    return _causal(model, x, target, saliency, steps, x, baseline_tensor(baseline, x), softmax,
                   memory_budget, batch_size, backend, compute_dtype, channels_last)


def insertion(model, x, target, saliency, *, steps: int = 100, softmax: bool = True, memory_budget=None,
              batch_size=None, backend=None, compute_dtype=None, channels_last=None):
    """Insertion (Petsiuk et al. 2018, RISE): the score as the most salient pixels of x are put
    back into a blurred copy (RISE's 11-tap Gaussian, sigma 5). Returns ``(curves [B, steps + 1],
    auc [B])`` as ``deletion`` (higher is better). Equals RISE's ``CausalMetric('ins', step,
    blur)`` with ``step = ceil(H*W/steps)`` and the target class instead of the top-1 class.
    """
    check_input(x)
    return _causal(model, x, target, saliency, steps, blur(x), x, softmax, memory_budget, batch_size, backend,
                   compute_dtype, channels_last)


def auc(curves: torch.Tensor, dx: float = 1.0) -> torch.Tensor:
    """Trapezoid area under each curve ``[..., n]`` -> ``[...]`` (Quantus' ``calculate_auc``,
    ``np.trapz(curve, dx=dx)``, which numpy 2.4 removed)."""
    check_tensor("curves", curves)
    return torch.trapezoid(curves, dx=dx, dim=-1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def faithfulness_correlation(model, x, target, attributions, *, runs: int = 100, subset_size: int = 224,
                             baseline=0.0, softmax: bool = True, seed: int = 0, memory_budget=None,
                             batch_size=None, backend=None, compute_dtype=None, channels_last=None) -> torch.Tensor:
    """Faithfulness correlation (Bhatt et al. 2020, "Evaluating and aggregating feature-based
    model explanations"): over ``runs`` random subsets of ``subset_size`` features, the Pearson
    correlation between the subsets' attribution sums and the score drops their removal causes.

    Arguments as ``pixel_flipping``; subsets are drawn from a ``torch.Generator`` seeded with
    ``seed`` (on CPU, so results are the same on every device). Returns ``[B]``.
    Equals Quantus 0.6 ``FaithfulnessCorrelation(nr_runs=runs, subset_size=s, perturb_baseline=b,
    similarity_func=correlation_pearson)`` up to the random subsets (Quantus draws them from
    numpy's global RNG).
    """
    attributions = _prepare(model, x, attributions)
    check_int("runs", runs)
    features = attributions[0].numel()
    check_int("subset_size", subset_size)
    if subset_size > features:
        raise ValueError(f"subset_size: {subset_size} exceeds the {features} features of attributions")
    B = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(features, generator=g) for _ in range(B * runs)]).to(x.device)
    base = baseline_tensor(baseline, x)
    engine = (softmax, memory_budget, batch_size, backend, compute_dtype, channels_last)
    clean = step_scores(model, x, target, descending_ranks(attributions), range(0, 1), 1, base, *engine)
    perturbed = step_scores(model, x.repeat_interleave(runs, 0), repeat_target(target, B, runs),
                            ranks.view(B * runs, *attributions.shape[1:]), range(1, 2), subset_size,
                            base.repeat_interleave(runs, 0), *engine)
    drops = clean - perturbed.view(B, runs)
    in_subset = (ranks < subset_size).view(B, runs, -1)
    sums = (in_subset * attributions.flatten(1)[:, None]).sum(-1)
    return _pearson(sums.double(), drops.double()).to(x.dtype)
