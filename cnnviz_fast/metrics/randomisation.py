"""Randomisation sanity checks: does the explanation change when the model or the explained
class does? ``method`` is any cnnviz explainer taking ``(model, x, target)`` or a callable
``(model, x, target) -> attributions`` (wrap explainers that need a layer in a lambda).
Similarities are per image over the flattened attributions: ``"spearman"`` (rank correlation,
tied values given their average rank, as scipy) or ``"pearson"``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ._engine import check_finite, check_input, check_model, repeat_target
from .faithfulness import _pearson

_SIMILARITIES = ("spearman", "pearson")
_ORDERS = ("cascading", "independent")


def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Rank of each value in its row, ties given their average rank (as scipy's ``rankdata``)."""
    values, order = torch.sort(a, dim=1)
    group = torch.cat([torch.zeros_like(values[:, :1], dtype=torch.long),
                       (values[:, 1:] != values[:, :-1]).long().cumsum(1)], 1)
    position = torch.arange(a.shape[1], dtype=a.dtype, device=a.device).expand_as(a)
    total = torch.zeros_like(a).scatter_add_(1, group, position)
    count = torch.zeros_like(a).scatter_add_(1, group, torch.ones_like(a))
    return torch.empty_like(a).scatter_(1, order, (total / count.clamp(min=1)).gather(1, group))


def _similarity(name):
    if name not in _SIMILARITIES:
        raise ValueError(f"similarity: expected one of {_SIMILARITIES}, got {name!r}")
    if name == "pearson":
        return _pearson
    return lambda a, b: _pearson(_ranks(a), _ranks(b))


def _explain(method, model, x, target, name="method") -> torch.Tensor:
    a = method(model, x, target)
    if not isinstance(a, torch.Tensor) or a.shape[0] != x.shape[0]:
        got = list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"{name}: expected attributions [B, ...] with B = {x.shape[0]}, got {got}")
    return check_finite(f"{name}'s attributions", a.detach().double().flatten(1))


def model_randomization(model, x, target, method, *, order: str = "cascading", similarity: str = "spearman",
                        seed: int = 0, last_only: bool = False) -> dict:
    """Model parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency
    maps", MPRT): the similarity between the explanation of the trained model and that of the
    model with its layers re-initialised from the output back.

    Layers are the modules with a ``reset_parameters`` method (convolutions, linear and
    batch-norm layers), last first; ``order="cascading"`` keeps the earlier randomisations,
    ``"independent"`` randomises one layer at a time. Each layer is re-initialised by its own
    ``reset_parameters()`` after ``torch.manual_seed(seed + 1)`` (inside ``torch.random.fork_rng``,
    so the caller's RNG is untouched) on a deep copy: ``model`` itself is never changed.
    Returns ``{layer name: similarity [B]}`` in randomisation order; ``last_only`` (cascading
    only): just the last entry, the fully randomised model, explained once instead of once per
    layer (Quantus' ``return_last_correlation=True``).
    Equals Quantus 0.6 ``MPRT(layer_order="top_down" | "independent", seed=seed,
    similarity_func=correlation_spearman | correlation_pearson, abs=False, normalise=False)``
    (Quantus' defaults add abs and max-normalisation, which Spearman's correlation ignores up
    to sign).
    """
    check_input(x)
    check_model(model, x)
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {_ORDERS}, got {order!r}")
    if last_only and order != "cascading":
        raise ValueError("last_only: needs order='cascading' (independent randomisations have no last state)")
    sim = _similarity(similarity)
    original = _explain(method, model, x, target)
    randomised = copy.deepcopy(model)
    pristine = copy.deepcopy(model.state_dict())
    layers = [(n, m) for n, m in randomised.named_modules() if hasattr(m, "reset_parameters")][::-1]
    results = {}
    for i, (name, module) in enumerate(layers):
        if order == "independent":
            randomised.load_state_dict(pristine)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(seed + 1)
            module.reset_parameters()
        if not last_only or i == len(layers) - 1:
            results[name] = sim(original, _explain(method, randomised, x, target)).to(x.dtype)
    return results


def random_logit(model, x, target, method, *, similarity: str = "spearman", seed: int = 0,
                 num_classes: int | None = None) -> torch.Tensor:
    """Random logit test (Sixt et al. 2020, "When explanations lie"): the similarity between
    the explanation of the target class and that of a random other class. Returns ``[B]``.

    The other classes are drawn as Quantus 0.6 ``RandomLogit(seed=seed, num_classes=n)`` draws
    them (numpy's ``RandomState(seed).randint(0, n - 1, B)`` over the classes other than the
    target), so this equals it with ``similarity_func=correlation_spearman |
    correlation_pearson``; Quantus' default similarity is SSIM, not offered here.
    num_classes: default the model's output width.
    """
    check_input(x)
    check_model(model, x)
    sim = _similarity(similarity)
    y = repeat_target(target, x.shape[0], 1).cpu()
    if num_classes is None:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"target: classes must lie in [0, {num_classes})")
    draws = torch.from_numpy(np.random.RandomState(seed).randint(0, num_classes - 1, x.shape[0]))
    off = (draws + (draws >= y).long()).to(x.device)  # skip the target class
    return sim(_explain(method, model, x, y.to(x.device)), _explain(method, model, x, off)).to(x.dtype)
