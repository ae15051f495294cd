"""Complexity metrics: how concentrated an attribution is. attributions: float ``[B, ...]``
(``[B, H, W]`` or ``[B, C, H, W]``); each returns ``[B]`` float64. Both take |a| normalised by
each sample's maximum first, as Quantus 0.6's defaults (``abs=True``, ``normalise=True``)."""
from __future__ import annotations

import torch

from .._checks import check_tensor
from ._engine import check_finite


def _normalised(attributions) -> torch.Tensor:
    check_tensor("attributions", attributions, ndim=(2, 3, 4))
    check_finite("attributions", attributions)
    a = attributions.double().flatten(1).abs()
    return a / torch.where(a.amax(1, keepdim=True) > 0, a.amax(1, keepdim=True), 1.0)


def sparseness(attributions) -> torch.Tensor:
    """Sparseness (Chalasani et al. 2020, "Concise explanations of neural networks using
    adversarial training"): the Gini index of |a|, 0 for uniform, near 1 for one feature.
    Equals Quantus 0.6 ``Sparseness()`` (including its +1e-7 on every value)."""
    a = torch.sort(_normalised(attributions) + 1e-7, dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    return ((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))


def complexity(attributions) -> torch.Tensor:
    """Complexity (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
    explanations"): the entropy of |a| / sum |a|, in nats; low for concentrated maps.
    Equals Quantus 0.6 ``Complexity()`` (including its 1e-12 inside the log)."""
    a = _normalised(attributions)
    p = a / a.sum(1, keepdim=True)
    return -(p * torch.log(p + 1e-12)).sum(1)
