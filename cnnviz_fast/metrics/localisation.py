"""Localisation metrics: how much of an attribution falls on the object, given ground-truth
masks. attributions: float ``[B, H, W]``; masks: bool ``[B, H, W]`` (any dtype, nonzero = in).
Each returns ``[B]`` float64 on the attributions' device; an empty mask gives NaN with a
warning, as Quantus 0.6. Quantus' default ``normalise=True`` (divide by the max |a|) does not
change any of these scores except through its epsilons, which are reproduced.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ._engine import check_attributions


def _prepare(attributions, masks):
    check_attributions("attributions", attributions, pixel_only=True)
    check_tensor("masks", masks, ndim=3, floating=False)
    if masks.shape != attributions.shape:
        raise ValueError(f"masks: expected shape {list(attributions.shape)} to match attributions, "
                         f"got {list(masks.shape)}")
    if masks.device != attributions.device:
        raise ValueError(f"masks: is on {masks.device} but attributions are on {attributions.device}")
    masks = masks.bool()
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        warnings.warn(f"masks: {int(empty.sum())} empty masks (images {empty.nonzero()[:, 0].tolist()[:8]}) "
                      f"give NaN scores", RuntimeWarning, stacklevel=3)
    return attributions.double().flatten(1), masks, empty


def _nan_where(score, empty):
    return score.masked_fill(empty, float("nan"))


def pointing_game(attributions, masks, *, tolerance: int = 0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"):
    1 where a maximum of the attribution lies within ``tolerance`` pixels (Euclidean) of the
    mask, else 0. ``tolerance=0`` is Quantus 0.6 ``PointingGame()``'s rule (any tied maximum
    on the mask); the paper uses 15 px.
    """
    a, m, empty = _prepare(attributions, masks)
    if not isinstance(tolerance, int) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"tolerance: expected an int >= 0 (pixels), got {tolerance!r}")
    if tolerance:
        r = torch.arange(-tolerance, tolerance + 1, device=m.device)
        disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance ** 2).double()
        m = F.conv2d(m[:, None].double(), disk[None, None], padding=tolerance)[:, 0] > 0.5
    hit = ((a == a.amax(1, keepdim=True)) & m.flatten(1)).any(1)
    return _nan_where(hit.double(), empty)


def energy_pointing_game(attributions, masks) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the positive
    attribution energy inside the mask's bounding box, ``sum(relu(a) in box) / sum(relu(a))``
    (0 for an all-non-positive map). No peer ships it; Quantus' ``RelevanceMassAccuracy`` is
    the same ratio over the mask itself without the ReLU.
    """
    a, m, empty = _prepare(attributions, masks)
    rows, cols = m.any(2), m.any(1)
    H, W = m.shape[1:]
    idx_h, idx_w = torch.arange(H, device=m.device), torch.arange(W, device=m.device)

    def span(any_, idx):  # [B, n] bool: between the first and last True
        first = torch.where(any_, idx, idx.numel()).amin(1, keepdim=True)
        last = torch.where(any_, idx, -1).amax(1, keepdim=True)
        return (idx >= first) & (idx <= last)

    box = span(rows, idx_h)[:, :, None] & span(cols, idx_w)[:, None, :]
    energy = a.clamp(min=0)
    total = energy.sum(1)
    inside = (energy * box.flatten(1)).sum(1)
    return _nan_where(torch.where(total > 0, inside / total.clamp(min=1e-300), 0.0), empty)


def relevance_mass_accuracy(attributions, masks) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI"): ``sum(a in mask) / sum(a)``.
    Equals Quantus 0.6 ``RelevanceMassAccuracy()`` (signed attributions, as its ``abs=False``)."""
    a, m, empty = _prepare(attributions, masks)
    return _nan_where((a * m.flatten(1)).sum(1) / a.sum(1), empty)


def relevance_rank_accuracy(attributions, masks) -> torch.Tensor:
    """Relevance rank accuracy (Arras et al. 2022): with K the mask's size, the share of the K
    highest-attributed pixels inside the mask. Equals Quantus 0.6 ``RelevanceRankAccuracy()``
    (ties of attribution keep index order; Quantus' unstable argsort breaks them at random)."""
    a, m, empty = _prepare(attributions, masks)
    order = torch.argsort(a, dim=1, descending=True, stable=True)
    k = m.flatten(1).sum(1, keepdim=True)
    top = torch.arange(a.shape[1], device=a.device)[None] < k
    hits = (m.flatten(1).gather(1, order) & top).sum(1)
    return _nan_where(hits.double() / k[:, 0].clamp(min=1), empty)


def attribution_localisation(attributions, masks) -> torch.Tensor:
    """Attribution localisation (Kohlbrenner et al. 2020, "Towards best practice in explaining
    neural network decisions with LRP"): the share of |a| inside the mask. Equals Quantus 0.6
    ``AttributionLocalisation()`` (its defaults ``abs=True``, ``normalise=True``, its 1e-9
    epsilon; not ``weighted``); the paper's variant on positive relevance is
    ``attribution_localisation(a.clamp(min=0), masks)``."""
    a, m, empty = _prepare(attributions, masks)
    a = a.abs()
    a = a / a.amax(1, keepdim=True).clamp(min=1e-300)
    return _nan_where((a * m.flatten(1)).sum(1) / (a.sum(1) + 1e-9), empty)
