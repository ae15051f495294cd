"""Activation investigation: layer outputs, and the dataset-wide top-k activating positions
per channel ("maximally activating patches", as NetDissect and zennit-crp collect them),
streamed in O(channels x k) memory instead of stored feature maps.

Each forward pass runs under ``torch.no_grad``; hooks hand each layer's output straight to
``channel_topk_update`` and drop it, so no layer output outlives its batch. Once every
requested layer has run, the rest of the forward pass is skipped (a private exception raised
from the last hook and caught here), which saves the compute of the later layers.
"""
from __future__ import annotations

import hashlib
import numbers
import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._atomic import atomic_write, remove_stale_temps
from .._checks import check_input, check_model, check_number, check_tensor
from .._hooks import capture, explaining, explanation, layer_name, resolve_layer
from .._precision import check_channels_last, check_compute_dtype, lowered
from .._progress import progress_bar
from ..ops import channel_topk_update, upsample_normalize
from ..reference.topk import best_k, empty_topk
from ..viz import colorize, image_grid

_STATE_FORMAT = "cnnviz_fast.TopKPatches/1"


class _StopForward(Exception):
    """Raised once every needed layer has run: the rest of the forward pass is skipped."""


def _forward_until(model: nn.Module, x: torch.Tensor, layers: dict) -> None:
    """Run ``model(x)`` without grad up to the last of ``layers`` ({name: module}) to run.

    Register this after the hooks that read the layers: hooks run in registration order.
    """
    fired = set()

    def make_hook(name):
        def hook(_module, _inputs, _output):
            if name in fired:
                raise ValueError(f"layer: {name!r} runs more than once per forward pass (a shared "
                                 f"module); choose a layer that runs once")
            fired.add(name)
            if len(fired) == len(layers):
                raise _StopForward
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in fired]
    if missing:
        raise ValueError(f"layer: {missing} never ran in the forward pass")


@explanation(target=False)
def layer_activations(model: nn.Module, x: torch.Tensor, layer, *, compute_dtype: torch.dtype | None = None,
                      channels_last: bool | None = None) -> torch.Tensor:
    """The output of ``layer`` (module or dotted name) for images ``x [B, 3, H, W]``.

    One forward pass without grad, stopped after the layer. Returns the layer's output as it
    is (``[B, C, h, w]`` for a convolutional layer), detached, on ``x``'s device. The value
    is the layer's true output even when a later in-place ReLU overwrites it. The model runs
    in eval mode and is left as found. compute_dtype / channels_last: the layers up to
    ``layer`` run on a converted copy (``cnnviz_fast._precision``; by default on CPU
    channels-last with batch norms folded, the layer's own output kept; ``channels_last=False``:
    the model as given, unless ``compute_dtype`` asks for a copy); the output is returned
    in ``x``'s dtype (bfloat16: each value within 2**-8 of its magnitude times the depth's
    accumulated rounding, fit for ranking and display, not for exact statistics).
    """
    module = resolve_layer(model, layer)
    runs, counterpart = lowered(model, x, compute_dtype, channels_last, keep=(module,))
    module = counterpart(module)
    with capture(runs, module) as record:
        _forward_until(runs, x, {layer_name(runs, module): module})
    out = record[module]
    return out.to(x.dtype).contiguous() if out.is_floating_point() else out


def activation_grid(activations: torch.Tensor, channels=None, nrow: int = 8, size=None,
                    cmap: str = "viridis", padding: int = 2) -> torch.Tensor:
    """Render one image's channel maps ``[C, h, w]`` (or ``[1, C, h, w]``) as one RGB grid.

    Each map is min-max normalized on its own (a constant map is black), enlarged to
    ``size`` (int or (H, W); default: unchanged) by nearest neighbour, colored with ``cmap``
    and tiled ``nrow`` per row. channels: indices to show (default all). Returns
    ``[3, H', W']`` float32 in [0, 1] on the input's device.
    """
    check_tensor("activations", activations, ndim=(3, 4))
    if activations.dim() == 4:
        if activations.shape[0] != 1:
            raise ValueError(f"activations: expected one image, got a batch of {activations.shape[0]}")
        activations = activations[0]
    maps = activations.detach()
    if channels is not None:
        maps = maps[_channel_index("channels", channels, maps.shape[0], maps.device)]
    maps = upsample_normalize(maps.float()[None], size, mode="nearest")[0]
    return image_grid(colorize(maps, cmap), nrow=nrow, padding=padding)


class TopKResult(NamedTuple):
    """One layer's top-k per channel, best first (value descending, then id, then position).

    values ``[C', k]`` (the layer's dtype; ``-inf`` in empty slots), ids ``[C', k]`` int64
    (-1 empty), positions ``[C', k, 2]`` int64 feature-map (y, x) (-1 empty), channels
    ``[C']`` int64 (the channel indices the rows stand for), feature_size ``(h, w)``.
    """

    values: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    channels: torch.Tensor
    feature_size: tuple


def _channel_index(name, channels, count, device):
    idx = torch.tensor(_channel_list(name, channels), dtype=torch.int64, device=device)
    if len(idx) == 0:
        raise ValueError(f"{name}: expected at least one channel index")
    bad = idx[(idx < 0) | (idx >= count)]
    if len(bad):
        raise ValueError(f"{name}: index {int(bad[0])} out of range for {count} channels")
    return idx


def _channel_list(name, channels) -> list:
    """Channel indices as a list of ints; fractions and bools are refused, not truncated."""
    values = channels.flatten().tolist() if isinstance(channels, torch.Tensor) else \
        [channels] if isinstance(channels, numbers.Number) else list(channels)
    for value in values:
        check_number(name, value, integer=True)
    return [int(v) for v in values]


def _model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state: names, shapes, dtypes and values of parameters and buffers."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TopKPatches:
    """Streaming top-k activating positions per channel of one or more layers.

    ``update(images [B, 3, H, W], ids [B])`` runs one batch; ``result()`` gives, per layer,
    the k (image id, position) pairs of the largest per-image spatial maxima of each channel
    (``TopKResult``). Each image contributes at most one entry per channel, its spatial
    maximum at the first position in row-major order; ties are broken by (id, position), so
    the answer does not depend on batch size or order. ``state_dict()`` and
    ``load_state_dict()`` save and resume a run; a state from another model (weights
    included), layer set, k or channel selection is refused, saying why.

    model: any ``nn.Module``, run in eval mode and left as found (see ``_hooks.explaining``). layers: a name, a module,
    or a list of them; each must output ``[B, C, h, w]`` and run once per forward pass (a
    shared module is read at its first call; one that runs again before the forward pass
    stops raises).
    k >= 1. channels: None (all), a list of indices for every layer, or ``{layer: list}``.
    backend: ``channel_topk_update``'s backend (default: automatic).
    compute_dtype / channels_last: the layers run on a copy converted at the first ``update``
    and kept for the run (``cnnviz_fast._precision``; by default on CPU channels-last with
    batch norms folded, the layers' own outputs kept, so float32 values may differ from the
    model's by float32 rounding and near-ties may swap; ``channels_last=False``: the model as
    given, bit for bit); activations are ranked in the images' dtype. In bfloat16, channels whose top activations differ by less than 2**-8 of their
    value may swap places in the ranking.
    Memory: ``3 * C * k`` numbers per layer, whatever the number of images.
    """

    def __init__(self, model: nn.Module, layers, k: int = 9, channels=None, backend=None, *,
                 compute_dtype: torch.dtype | None = None, channels_last: bool | None = None):
        check_model(model)
        self.compute_dtype, self.channels_last = check_compute_dtype(compute_dtype), check_channels_last(channels_last)
        self._lowered = None  # (model that runs, counterpart), made at the first update
        check_number("k", k, 1, integer=True)
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not layers:
            raise ValueError("layers: expected at least one layer")
        self.model, self.k, self.backend = model, k, backend
        self._modules = {}
        for layer in layers:
            module = resolve_layer(model, layer)
            self._modules[layer_name(model, module)] = module
        if isinstance(channels, dict):
            unknown = set(channels) - set(self._modules)
            if unknown:
                raise ValueError(f"channels: layers {sorted(unknown)} are not in layers {list(self._modules)}")
            self._channels = {n: channels.get(n) for n in self._modules}
        else:
            self._channels = {n: channels for n in self._modules}
        self._channels = {n: None if c is None else _channel_list(f"channels (layer {n!r})", c)
                          for n, c in self._channels.items()}
        self._lists, self._shapes = {}, {}
        self.images_seen = self.batches_seen = 0
        self._fingerprint = _model_fingerprint(model)

    @property
    def layers(self) -> list:
        return list(self._modules)

    def update(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Add a batch. ids: int64 ``[B]`` >= 0, default the running image count onwards.
        The state changes only when the whole batch went through."""
        check_input(self.model, images, "images")
        B = images.shape[0]
        if ids is None:
            ids = torch.arange(self.images_seen, self.images_seen + B)
        ids = torch.as_tensor(ids).to(images.device)
        if ids.dim() != 1 or ids.shape[0] != B or ids.is_floating_point():
            raise ValueError(f"ids: expected {B} integer ids (one per image), got shape {list(ids.shape)}")
        pending = {}

        def make_hook(name):
            def hook(_module, _inputs, output):
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    output = output.to(images.dtype)
                pending[name] = self._merge(name, output, ids.long())
            return hook

        if self._lowered is None:
            self._lowered = lowered(self.model, images, self.compute_dtype, self.channels_last,
                                   keep=tuple(self._modules.values()))
        runs, counterpart = self._lowered
        modules = {n: counterpart(m) for n, m in self._modules.items()}
        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
        try:
            with explaining(self.model, images, "images"):
                _forward_until(runs, images, modules)
        finally:
            for h in handles:
                h.remove()
        self._lists.update(pending)
        self.images_seen += B
        self.batches_seen += 1

    def _merge(self, name, output, ids):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer: {name!r} outputs {shape}, expected a 4-D feature map [B, C, h, w]")
        shape = tuple(output.shape[1:])
        if name not in self._shapes:
            self._shapes[name] = shape
        elif self._shapes[name] != shape:
            raise ValueError(f"layer: {name!r} outputs [C, h, w] = {list(shape)}, but this run began with "
                             f"{list(self._shapes[name])} (images of another size?)")
        chosen = self._channels[name]
        if chosen is not None:
            output = output.index_select(1, _channel_index(f"channels (layer {name!r})", chosen, shape[0],
                                                           output.device))
        lists = self._lists.get(name)
        if lists is None:
            lists = empty_topk(output.shape[1], self.k, output.dtype, output.device)
        lists = [t.to(output.device) for t in lists]
        return channel_topk_update(output, ids, lists[0].to(output.dtype), lists[1], lists[2],
                                   backend=self.backend)

    def result(self) -> dict:
        """``{layer name: TopKResult}`` for the layers that have seen a batch."""
        out = {}
        for name, (values, ids, pos) in self._lists.items():
            C, h, w = self._shapes[name]
            chosen = self._channels[name]
            channels = torch.arange(C) if chosen is None else torch.tensor(chosen)
            positions = torch.where(pos[..., None] >= 0, torch.stack([pos // w, pos % w], -1), -1)
            out[name] = TopKResult(values.clone(), ids.clone(), positions, channels.to(values.device), (h, w))
        return out

    def state_dict(self) -> dict:
        """The run's state (CPU tensors and plain values), for ``torch.save``."""
        return {"format": _STATE_FORMAT, "model": self._fingerprint, "layers": self.layers, "k": self.k,
                "channels": self._channels, "images_seen": self.images_seen,
                "batches_seen": self.batches_seen, "shapes": dict(self._shapes),
                "lists": {n: [t.cpu() for t in lists] for n, lists in self._lists.items()}}

    def _check_state(self, state, action: str) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state: not a TopKPatches state ({_STATE_FORMAT})")
        if state["model"] != self._fingerprint:
            raise ValueError(f"state: made with a different model (architecture or weights differ); "
                             f"refusing to {action}")
        for key, mine in (("layers", self.layers), ("k", self.k), ("channels", self._channels)):
            if state[key] != mine:
                raise ValueError(f"state: made with {key}={state[key]!r}, this run has {key}={mine!r}; "
                                 f"refusing to {action}")

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; refuses a state made with another model or settings."""
        self._check_state(state, "resume")
        self._shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        self._lists = {n: list(lists) for n, lists in state["lists"].items()}
        self.images_seen, self.batches_seen = state["images_seen"], state["batches_seen"]

    def merge(self, other) -> "TopKPatches":
        """Fold another run over other images (a ``TopKPatches`` or its ``state_dict()``) into
        this one, exactly: the result equals one run over both runs' images, ties broken the
        same way (value, then id, then position), whatever the split. Each channel keeps the
        best k of the two lists; an image id in both lists is one image counted twice (a
        retried batch, or a state merged with itself) and is kept once, so merging is
        idempotent. ``images_seen`` and ``batches_seen`` add up. States from another model
        (weights included), layer set, k or channel selection, or of other feature-map sizes,
        are refused. Returns ``self``.
        """
        state = other.state_dict() if isinstance(other, TopKPatches) else other
        self._check_state(state, "merge")
        for name, shape in state["shapes"].items():
            if name in self._shapes and self._shapes[name] != tuple(shape):
                raise ValueError(f"state: layer {name!r} outputs [C, h, w] = {list(shape)} there but "
                                 f"{list(self._shapes[name])} here (images of another size?); refusing to merge")
        for name, theirs in state["lists"].items():
            mine = self._lists.get(name)
            self._lists[name] = list(theirs) if mine is None else _merge_lists(mine, theirs, self.k)
            self._shapes[name] = tuple(state["shapes"][name])
        self.images_seen += state["images_seen"]
        self.batches_seen += state["batches_seen"]
        return self


def _merge_lists(mine, theirs, k: int):
    """Two channel_topk_update lists ``(values, ids, pos)`` ``[C, k]`` -> their best k, each
    image id once (its best entry; the two are equal when one image was counted twice)."""
    device = mine[0].device
    values, ids, pos = (torch.cat([a, b.to(device=device, dtype=a.dtype)], 1) for a, b in zip(mine, theirs))
    values, ids, pos = best_k(values, ids, pos, values.shape[1])
    n = ids.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)  # [j, i]: i comes before j
    repeated = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(2) & (ids >= 0)
    # a repeat becomes an empty slot, which sorts after every real entry
    values = values.masked_fill(repeated, float("-inf"))
    return best_k(values, ids.masked_fill(repeated, -1), pos.masked_fill(repeated, -1), k)


def _batches(data, batch_size: int, skip: int):
    """(images, ids) batches of ``data`` from image number ``skip`` on.

    data: a tensor ``[N, 3, H, W]`` (ids 0..N-1), a dataset with ``batches(batch_size)``
    yielding ``(images, ..., ids)`` (``cnnviz_fast.data.image_folder``), a map-style
    ``torch.utils.data.Dataset`` (items: an image or a tuple starting with one; ids are
    indices), or any other iterable of
    batches: images, ``(images, ids)`` or ``(images, labels, ids)`` (ids default to the
    running count). Iterables are re-read from their start and the first ``skip`` images are
    dropped, so resuming needs the same order on every pass.
    """
    if isinstance(data, torch.Tensor):
        check_tensor("data", data, ndim=4)
        # an empty tensor still runs (an empty batch), so its result has the layers' shapes
        for start in range(skip, len(data), batch_size) if len(data) else [0]:
            yield data[start:start + batch_size], torch.arange(start, min(start + batch_size, len(data)))
        return
    if hasattr(data, "batches"):
        source = (batch for batch in data.batches(batch_size))
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        def indexed():
            for start in range(skip, len(data), batch_size):
                items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
                images = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
                yield images, torch.arange(start, start + len(items))
        source, skip = indexed(), 0
    else:
        source = iter(data)
    seen = 0
    for batch in source:
        images, ids = (batch[0], batch[-1]) if isinstance(batch, (tuple, list)) else (batch, None)
        check_tensor("data", images, ndim=4)
        n = len(images)
        if ids is None:
            ids = torch.arange(seen, seen + n)
        drop = min(max(skip - seen, 0), n)
        seen += n
        if drop < n:
            yield images[drop:], torch.as_tensor(ids)[drop:]


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"checkpoint: {path} is not a TopKPatches checkpoint (empty, truncated or another "
                         f"kind of file: {err}); delete it to start afresh") from err
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"checkpoint: {path} is not a TopKPatches checkpoint ({_STATE_FORMAT})")
    return state


def _save_atomic(state: dict, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save(state, f)


def top_k_patches(model: nn.Module, data, layers, k: int = 9, channels=None, batch_size: int = 64,
                  checkpoint=None, every: int = 50, progress: bool | None = None, backend=None, *,
                  compute_dtype: torch.dtype | None = None, channels_last: bool | None = None) -> dict:
    """Run a whole dataset through ``model`` and return ``{layer: TopKResult}`` (see
    ``TopKPatches``): the k images and positions activating each channel most.

    data: a tensor ``[N, 3, H, W]``, ``cnnviz_fast.data.image_folder(...)``, a map-style
    dataset or an iterable of batches (see ``_batches``); images go to the model's device.
    checkpoint: a file path; every ``every`` batches and at the end the state is written
    atomically (temporary file, then ``os.replace``), and an existing checkpoint is resumed:
    the images it counts are skipped exactly, none lost or counted twice. Resuming needs the
    data in the same deterministic order and the same model, layers, k and channels (else it
    is refused). Temporary files a killed save left beside the checkpoint are removed at
    load; a file that is not a checkpoint raises ``ValueError`` naming it. Results equal an
    uninterrupted run and do not depend on ``batch_size``.
    progress: a tqdm bar of images on stderr; None (default) shows it on an interactive terminal
    once the run has taken a few seconds (``cnnviz_fast._progress``). compute_dtype /
    channels_last: see ``TopKPatches``.
    """
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("every", every, 1, integer=True)
    run = TopKPatches(model, layers, k=k, channels=channels, backend=backend, compute_dtype=compute_dtype,
                      channels_last=channels_last)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None:
        remove_stale_temps(path)
    if path is not None and path.exists():
        run.load_state_dict(_load_checkpoint(path))
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # the length of an iterable of batches counts batches, not images: no total there
    counted = isinstance(data, (torch.Tensor, torch.utils.data.Dataset)) and hasattr(data, "__len__")
    total = len(data) if counted else None
    with explaining(model), progress_bar(progress, "top_k_patches", total, "img", run.images_seen) as bar:
        for images, ids in _batches(data, batch_size, run.images_seen):
            run.update(images.to(device), ids.to(device))
            bar.update(len(images))
            if path is not None and run.batches_seen % every == 0:
                _save_atomic(run.state_dict(), path)
    if path is not None:
        _save_atomic(run.state_dict(), path)
    return run.result()
