"""channel_topk_update_ref: the running per-channel top-k of spatial maxima, by storing
every candidate and sorting them all (the definition of correct for the fast kernels).

Conventions shared by every backend:

- each (image, channel) map contributes one candidate: its spatial maximum and the flat
  position ``y * w + x`` of its first occurrence in row-major order (``torch.argmax``);
- candidates are ordered by value descending, then image id ascending, then position
  ascending, so the answer does not depend on batch size or order;
- an empty slot holds value ``-inf``, id ``-1``, position ``-1``; ids must be >= 0, so a map
  whose maximum is ``-inf`` never displaces a slot and never enters;
- a NaN activation has no rank: it raises ``ValueError`` and nothing is updated.
"""
import torch


def empty_topk(channels: int, k: int, dtype=torch.float32, device=None):
    """Empty running lists ``(values [C, k] = -inf, ids [C, k] = -1, pos [C, k] = -1)``."""
    values = torch.full((channels, k), float("-inf"), dtype=dtype, device=device)
    ids = torch.full((channels, k), -1, dtype=torch.int64, device=device)
    return values, ids, ids.clone()


def nan_error(channel: int) -> ValueError:
    return ValueError(f"activations: channel {channel} holds NaN; a NaN has no rank, so its top-k "
                      f"is undefined (check the model and the input)")


def channel_topk_update_ref(activations, ids, running_values, running_ids, running_pos):
    """activations ``[B, C, h, w]``, ids ``[B]`` int64, running lists ``[C, k]`` ->
    the merged lists ``(values, ids, pos)``, each ``[C, k]``. Inputs are not modified."""
    flat = activations.flatten(2)
    nan = torch.isnan(flat).any(dim=(0, 2)).nonzero()
    if len(nan):
        raise nan_error(int(nan[0]))
    C, B = flat.shape[1], flat.shape[0]
    k = running_values.shape[1]
    values = torch.cat([running_values, flat.amax(2).T.to(running_values.dtype)], 1)
    cand_ids = torch.cat([running_ids, ids.view(1, B).expand(C, B)], 1)
    pos = torch.cat([running_pos, flat.argmax(2).T], 1)
    return best_k(values, cand_ids, pos, k)


def best_k(values, ids, pos, k):
    """The first ``k`` of each row of candidates ``[C, n]`` by value descending, then id, then
    position ascending: ``(values, ids, pos)``, each ``[C, k]``."""
    # torch.topk's order among equal values is unspecified: sort explicitly, least
    # significant key first, with stable sorts (a lexsort by (-value, id, pos)).
    order = torch.argsort(pos, dim=1, stable=True)
    order = order.gather(1, torch.argsort(ids.gather(1, order), dim=1, stable=True))
    order = order.gather(1, torch.argsort(values.gather(1, order), dim=1, descending=True, stable=True))
    top = order[:, :k]
    return values.gather(1, top), ids.gather(1, top), pos.gather(1, top)


def channel_topk_ref(activations, ids, k):
    """Store-all: the top-k of every channel over all of ``activations [N, C, h, w]`` at once."""
    empty = empty_topk(activations.shape[1], k, activations.dtype, activations.device)
    return channel_topk_update_ref(activations, ids, *empty)
