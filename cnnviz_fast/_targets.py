"""Targets: which output scores an explanation explains.

An int (one class for every sample), a sequence or 1-D tensor of one int per sample, a
``[B, k]`` integer tensor for several classes per sample (results gain a ``k`` axis), or a
callable ``f(output) -> [B]`` scores (segmentation- or detection-style targets). Where the
model names its classes in ``model.class_names`` (a sequence of str, as ``shapes_cnn()``
does), class names stand for their indices: ``"circle"``, ``["circle", "star"]``, or lists of
k names per sample. ``None`` is the class the model predicts for each sample (the argmax of
its output on ``x``, one extra forward pass), as pytorch-grad-cam's ``targets=None``.
"""
from __future__ import annotations

import torch

from ._checks import check_finite


_EXPECTED = "an int, a class name, a sequence of them, a [B, k] tensor, a callable or None"


def class_names_as_indices(model, target):
    """``target`` with class names (str, or nested lists of str) replaced by their indices in
    ``model.class_names``; other targets are returned as they are."""
    def has_names(t):
        return isinstance(t, str) or (isinstance(t, (list, tuple)) and any(has_names(v) for v in t))

    if not has_names(target):
        return target
    names = getattr(model, "class_names", None)
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)):
        raise TypeError(f"target: the class name(s) {target!r} need the model's class names in "
                        f"model.class_names (a sequence of str), which {type(model).__name__} does not "
                        f"have; pass class indices instead")
    lookup = {n: i for i, n in enumerate(names)}

    def convert(t):
        if isinstance(t, (list, tuple)):
            return [convert(v) for v in t]
        if isinstance(t, str):
            if t not in lookup:
                raise ValueError(f"target: unknown class name {t!r}; the model's classes are {list(names)}")
            return lookup[t]
        return t
    return convert(target)


def predicted_classes(output: torch.Tensor) -> torch.Tensor:
    """The argmax class per sample of a ``[B, classes]`` output (the target ``None`` stands for)."""
    if output.dim() != 2:
        raise ValueError(f"target: None means the predicted class, which needs a [B, classes] model "
                         f"output, got shape {tuple(output.shape)}; pass a callable target instead")
    return output.detach().argmax(1)


def _index_tensor(target, batch: int, device) -> torch.Tensor:
    """Class indices (a sequence, array or tensor) as a long tensor: 0-D, ``[B]`` or ``[B, k]``
    with ``k >= 1``."""
    try:
        idx = torch.as_tensor(target, device=device)
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"target: expected {_EXPECTED}; got {type(target).__name__} that is not a "
                         f"rectangular array of class indices ({err})") from None
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"target: expected integer class indices, got dtype {idx.dtype}")
    if idx.dim() not in (0, 1, 2) or (idx.dim() and idx.shape[0] != batch):
        raise ValueError(f"target: expected an int, {batch} ints or a [{batch}, k] tensor, "
                         f"got shape {tuple(idx.shape)}")
    if idx.dim() == 2 and idx.shape[1] == 0:
        raise ValueError(f"target: a [{batch}, 0] target names no class; give at least one per sample")
    return idx.long()


def method_target(model, target, batch: int, device):
    """A public method's target as the methods use it: class names become indices and
    sequences of indices checked long tensors; ints, callables and None pass as they are."""
    target = class_names_as_indices(model, target)
    if target is None or callable(target) or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    return _index_tensor(target, batch, device)


def target_indices(target, batch: int, num_outputs: int, device) -> torch.Tensor:
    """Class indices as a long tensor ``[B]`` or ``[B, k]``, range-checked."""
    if isinstance(target, bool) or target is None:
        raise TypeError(f"target: expected {_EXPECTED}, got {'a bool' if target is not None else 'None'}")
    if isinstance(target, int):
        if not 0 <= target < num_outputs:  # before torch.full, which overflows past int64
            raise ValueError(f"target: class {target} is out of range for a model with {num_outputs} outputs")
        idx = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        idx = _index_tensor(target, batch, device)
        if idx.dim() == 0:
            idx = idx.expand(batch)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_outputs):
        bad = idx[(idx < 0) | (idx >= num_outputs)][0].item()
        raise ValueError(f"target: class {bad} is out of range for a model with {num_outputs} outputs")
    return idx


def target_scores(output: torch.Tensor, target) -> torch.Tensor:
    """The scores of ``target`` in ``output``: ``[B]``, or ``[B, k]`` for ``[B, k]`` targets."""
    if callable(target):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (output.shape[0],):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"target: the callable must return one score per sample, shape "
                             f"({output.shape[0]},), got {got}")
        check_finite("target", scores.detach(), "scores from the model (the callable's output)")
        return scores
    if output.dim() != 2:
        raise ValueError(f"target: class indices need a [B, classes] model output, got shape "
                         f"{tuple(output.shape)}; pass a callable target instead")
    idx = target_indices(target, output.shape[0], output.shape[1], output.device)
    scores = output.gather(1, idx[:, None]).squeeze(1) if idx.dim() == 1 else output.gather(1, idx)
    check_finite("target", scores.detach(), "scores from the model (output rows and classes)")
    return scores
