"""Targets: which output scores an explanation explains.

An int (one class for every sample), a sequence or 1-D tensor of one int per sample, a
``[B, k]`` integer tensor for several classes per sample (results gain a ``k`` axis), or a
callable ``f(output) -> [B]`` scores (segmentation- or detection-style targets).
"""
from __future__ import annotations

import torch


def target_indices(target, batch: int, num_outputs: int, device) -> torch.Tensor:
    """Class indices as a long tensor ``[B]`` or ``[B, k]``, range-checked."""
    if isinstance(target, bool):
        raise TypeError("target: expected an int, a sequence of ints, a [B, k] tensor or a callable, got a bool")
    if isinstance(target, int):
        idx = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        idx = torch.as_tensor(target, device=device)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"target: expected integer class indices, got dtype {idx.dtype}")
        idx = idx.long()
        if idx.dim() == 0:
            idx = idx.expand(batch)
        if idx.dim() not in (1, 2) or idx.shape[0] != batch:
            raise ValueError(f"target: expected an int, {batch} ints or a [{batch}, k] tensor, "
                             f"got shape {tuple(idx.shape)}")
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
        return scores
    if output.dim() != 2:
        raise ValueError(f"target: class indices need a [B, classes] model output, got shape "
                         f"{tuple(output.shape)}; pass a callable target instead")
    idx = target_indices(target, output.shape[0], output.shape[1], output.device)
    if idx.dim() == 1:
        return output.gather(1, idx[:, None]).squeeze(1)
    return output.gather(1, idx)
