"""The perturbation engine shared by the faithfulness metrics: argument checks, baselines,
ranks, and the streaming of every perturbed copy through the model (or its converted copy,
``cnnviz_fast._precision``).

All steps of all images go through the model in chunks of as many copies as a memory budget
holds; ``ops.perturb_by_rank`` writes each chunk straight into its batch buffer (channels-last
on CPU, where oneDNN's convolutions run faster), and the target's score (softmaxed when
asked) is gathered from the chunk's output before the next chunk is made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_input as check_model_input, check_tensor
from .._hooks import layout_probe
from .._precision import lowered
from .._targets import target_indices

_CPU_MEMORY_BUDGET = 1 << 30
# On CPU, past a few dozen copies per forward pass larger batches stop paying off, then lose
# (the default model's time per image grows 1.6x from batches of 64 to 256; ResNet-18 at 224
# px gains 1% from 16 to 32): the budget's chunk is capped there.
_CPU_MAX_CHUNK = 64
# RISE's blur (Petsiuk et al. 2018, evaluation.py): an 11-tap Gaussian of sigma 5, zero padding.
_BLUR_TAPS, _BLUR_SIGMA = 11, 5.0
BASELINES = ("mean", "black", "white", "blur")


def check_model(model, x) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model: is in training mode (dropout and batch-norm statistics would change "
                         "the scores); call model.eval() first, as Quantus requires")
    check_model_input(model, x)


def check_input(x) -> torch.Tensor:
    return check_tensor("x", x, ndim=4)


def check_attributions(name: str, a, x: torch.Tensor | None = None, pixel_only: bool = False) -> torch.Tensor:
    """``[B, H, W]`` (or ``[B, C, H, W]`` unless ``pixel_only``) matching x when given, no NaN."""
    check_tensor(name, a, ndim=3 if pixel_only else (3, 4))
    if x is not None:
        B, C, H, W = x.shape
        allowed = [(B, H, W)] if pixel_only else [(B, H, W), (B, C, H, W)]
        if tuple(a.shape) not in allowed:
            want = " or ".join(str(list(s)) for s in allowed)
            raise ValueError(f"{name}: expected shape {want} to match x {list(x.shape)}, got {list(a.shape)}")
        if a.device != x.device:
            raise ValueError(f"{name}: is on {a.device} but x is on {x.device}")
    return check_finite(name, a)


def check_finite(name: str, a: torch.Tensor) -> torch.Tensor:
    if torch.isnan(a).any():
        first = tuple(torch.isnan(a).nonzero()[0].tolist())
        raise ValueError(f"{name}: contains NaN (first at index {first})")
    return a


def check_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's substrate for insertion: each channel convolved with an 11-tap Gaussian (sigma 5)."""
    t = torch.arange(_BLUR_TAPS, dtype=torch.float64) - _BLUR_TAPS // 2
    g = torch.exp(-t ** 2 / (2 * _BLUR_SIGMA ** 2))
    kernel = (g[:, None] * g[None, :] / (g.sum() ** 2)).to(x.dtype).to(x.device)
    C = x.shape[1]
    return F.conv2d(x, kernel.expand(C, 1, -1, -1), padding=_BLUR_TAPS // 2, groups=C)


def baseline_tensor(baseline, x: torch.Tensor) -> torch.Tensor:
    """A float, a tensor broadcastable to x, ``"mean"``, ``"black"``/``"white"`` (each image's
    min/max over all its elements, as Quantus) or ``"blur"`` -> ``[B, C, H, W]`` (maybe expanded)."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected a number, a tensor or one of {BASELINES}, got {baseline!r}")
        if baseline == "blur":
            return blur(x)
        flat = x.flatten(1)
        value = {"mean": flat.mean, "black": lambda d: flat.amin(d), "white": lambda d: flat.amax(d)}[baseline](1)
        return value.view(-1, 1, 1, 1).expand_as(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full((1, 1, 1, 1), float(baseline), dtype=x.dtype, device=x.device).expand_as(x)
    if isinstance(baseline, torch.Tensor):
        if baseline.device != x.device:
            raise ValueError(f"baseline: is on {baseline.device} but x is on {x.device}")
        try:
            return baseline.to(x.dtype).expand_as(x)
        except RuntimeError:
            raise ValueError(f"baseline: expected a tensor broadcastable to x's shape {list(x.shape)}, "
                             f"got {list(baseline.shape)}") from None
    raise TypeError(f"baseline: expected a number, a tensor or one of {BASELINES}, got {type(baseline).__name__}")


def descending_ranks(a: torch.Tensor) -> torch.Tensor:
    """Rank of every element of each sample (0 = largest); ties keep index order (stable)."""
    flat = a.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=a.device).expand_as(order))
    return ranks.view(a.shape)


def _probe(model, x):
    """The model on one image: an upper bound of one copy's activation bytes (every leaf
    module's output), the layout the model takes (channels-last on CPU unless the model fails
    on it, ``x.view``) and the output."""
    output, total, layout = layout_probe(model, x[:1])
    sample = x[0].numel() * x.element_size()
    return max(total, sample) + 2 * sample, layout, output


def chunk_size(model, x, memory_budget=None, batch_size=None):
    """Copies per forward pass, the layout and the model's output on one image;
    ``batch_size`` overrides the memory budget."""
    per_copy, layout, output = _probe(model, x)
    if batch_size is not None:
        return check_int("batch_size", batch_size), layout, output
    if memory_budget is None:
        memory_budget = torch.cuda.mem_get_info(x.device)[0] // 2 if x.is_cuda else _CPU_MEMORY_BUDGET
    elif not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget!r}")
    chunk = max(1, int(memory_budget // per_copy))
    return (chunk if x.is_cuda else min(chunk, _CPU_MAX_CHUNK)), layout, output


def scores_fn(softmax: bool):
    return (lambda out: out.softmax(1)) if softmax else (lambda out: out)


def step_scores(model, x, target, ranks, steps: range, features_in_step: int, baseline: torch.Tensor,
                softmax: bool = True, memory_budget=None, batch_size=None, backend=None, compute_dtype=None,
                channels_last=None) -> torch.Tensor:
    """``[B, len(steps)]``: the target's score on step s of every image, where step s replaces
    the features of rank ``< s * features_in_step`` by the baseline (step 0 is the clean image).

    Chunks: whole images with all their steps when one image's steps fit, else one image's
    steps in equal runs of at most the chunk size; one ``perturb_by_rank`` call and one
    forward pass each, on the model ``_precision.lowered`` gives (``compute_dtype``,
    ``channels_last``: a channels-last copy with folded batch norms on CPU by default).
    """
    B = x.shape[0]
    S = len(steps)
    model, _ = lowered(model, x, compute_dtype, channels_last)
    chunk, layout, probe = chunk_size(model, x, memory_budget, batch_size)
    if channels_last is False:
        layout = torch.contiguous_format
    if probe.dim() != 2:
        raise ValueError(f"model: expected a [B, classes] output, got shape {list(probe.shape)}")
    if callable(target):
        raise TypeError("target: expected an int or one class per image; the metrics score classes")
    idx = target_indices(target, B, probe.shape[1], x.device)
    if idx.dim() != 1:
        raise ValueError("target: expected one class per image (an int or [B] ints), got [B, k]")
    channels_last = layout == torch.channels_last
    score = scores_fn(softmax)
    out = torch.empty((B, S), dtype=x.dtype, device=x.device)
    if chunk >= S:
        per = chunk // S
        pieces = [(b, min(b + per, B), 0, S) for b in range(0, B, per)]
    else:
        run = -(-S // -(-S // chunk))  # equal runs: 96 steps in chunks of 64 go as 48 + 48
        pieces = [(b, b + 1, s, min(s + run, S)) for b in range(B) for s in range(0, S, run)]
    with torch.no_grad():
        for b0, b1, s0, s1 in pieces:
            copies = ops.perturb_by_rank(x[b0:b1], ranks[b0:b1], steps.start + s0, steps.start + s1,
                                         features_in_step, baseline[b0:b1], channels_last=channels_last,
                                         backend=backend)
            y = score(model(copies))
            rows = idx[b0:b1].repeat_interleave(s1 - s0)
            out[b0:b1, s0:s1] = y.gather(1, rows[:, None]).view(b1 - b0, s1 - s0)
    return out


def repeat_target(target, batch: int, times: int) -> torch.Tensor:
    """An int or ``[B]`` ints, each repeated ``times`` times (range-checked by the model's pass)."""
    if isinstance(target, bool) or callable(target):
        raise TypeError("target: expected an int or one class per image")
    idx = torch.as_tensor(target).long()
    if idx.dim() == 0:
        idx = idx.expand(batch)
    if idx.shape != (batch,):
        raise ValueError(f"target: expected an int or {batch} ints, got shape {list(idx.shape)}")
    return idx.repeat_interleave(times)
