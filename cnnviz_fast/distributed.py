"""Scale-out on Ray Data: explanations, top-k patches and embeddings over a ``ray.data.Dataset``.

Ray Data's batch-inference pattern: a callable class per actor builds the model once in
``__init__`` (``model_fn()``, so weights never travel with each task) and runs one batch in
``__call__``; ``ds.map_batches(Cls, concurrency=num_actors, num_gpus=num_gpus_per_actor,
batch_size=batch_size)``. Each actor runs the single-process batch function of the package
(``TopKPatches.update``, ``embed``), so Ray adds no numerics: the results equal the
single-process run.

Faults: Ray Data gives map actors ``max_restarts=-1`` and ``max_task_retries=-1``, so a
killed actor is restarted and the batch it was running is run again. Nothing an actor held
is needed afterwards: top-k actors emit each batch's state (merged on the driver, exactly and
idempotently, by ``TopKPatches.merge``), and embedding actors write each batch's shard
atomically under a name fixed by the batch's ids, so a retried batch rewrites the same file.

Rows: an image column (``image``: uint8 ``[H, W, C]`` as ``ray.data.read_images`` gives it,
scaled to [0, 1]; or float ``[C, H, W]`` arrays, taken as they are) and an integer id column
(``id``, >= 0). Without an id column, a ``path`` column (``read_images(...,
include_paths=True)``) gives each image the rank of its path among the sorted paths as id.

Each actor takes one CPU and runs one thread (Ray sets ``OMP_NUM_THREADS`` to its CPUs),
plus ``num_gpus_per_actor`` GPUs. Where the actors take every CPU of the cluster, a dataset
that still has to be read (``read_images``) would find no CPU for its read tasks and Ray
Data would wait forever: such a dataset is read into the object store first
(``ds.materialize()``).

Ray is imported inside the functions: ``import cnnviz_fast`` never imports it
(``pip install cnnviz-fast[ray]`` brings ``ray[data]``).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_write
from .explain.activations import TopKPatches
from .explain.features import Embeddings, _read_shard, embed, write_embedding_shard

EMBEDDINGS_MANIFEST = "embeddings.json"
_EMBEDDINGS_FORMAT = "cnnviz_fast.embeddings/1"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra, not only the core)
    except ImportError as err:
        raise ImportError("cnnviz_fast.distributed needs Ray Data: pip install 'ray[data]' "
                          "(or pip install cnnviz-fast[ray])") from err
    return ray


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _id_lookup(ds, id_column: str, image_column: str):
    """None when ``ds`` has ``id_column``; else ``{path: rank among the sorted paths}``."""
    names = ds.schema().names
    if image_column not in names:
        raise ValueError(f"image_column: the dataset has no column {image_column!r} (columns: {names})")
    if id_column in names:
        return None
    if "path" not in names:
        raise ValueError(f"id_column: the dataset has no column {id_column!r} and no 'path' column to "
                         f"number the images by (columns: {names})")
    return {p: i for i, p in enumerate(sorted(ds.unique("path"), key=Path))}  # as dataset_items numbers them


def _stacked(x: np.ndarray, column: str) -> np.ndarray:
    """A batch of an image column as one array ``[B, ...]`` (Ray gives differently shaped
    images as an object array)."""
    if x.dtype == object:
        shapes = {a.shape for a in x}
        if len(shapes) > 1:
            raise ValueError(f"{column}: images of several shapes {sorted(shapes)} in one batch; resize "
                             f"them first (read_images(size=...))")
        x = np.stack(list(x))
    return x


def _images(x: np.ndarray, column: str) -> torch.Tensor:
    """A stacked image batch -> float32 ``[B, C, H, W]``: uint8 ``[B, H, W(, C)]`` (as
    ``read_images`` gives) scaled to [0, 1], float ``[B, C, H, W]`` taken as it is."""
    images = torch.from_numpy(np.ascontiguousarray(x))
    if images.dtype == torch.uint8:
        images = (images[..., None] if images.dim() == 3 else images).permute(0, 3, 1, 2).float() / 255
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{column}: expected uint8 [H, W, C] or float [C, H, W] images, got "
                         f"{images.dtype} batch {list(images.shape)}")
    return images


class _Rows:
    """A Ray batch (dict of numpy arrays) -> ``(images float32 [B, C, H, W], ids int64 [B])``."""

    def __init__(self, image_column: str, id_column: str, paths, device):
        self.image_column, self.id_column, self.paths, self._device = image_column, id_column, paths, device

    @property
    def device(self) -> torch.device:
        # resolved where it is used: the actor's process, which sees the GPUs Ray gave it
        return torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def __call__(self, batch: dict):
        images = _images(_stacked(batch[self.image_column], self.image_column), self.image_column)
        if self.paths is None:
            ids = torch.from_numpy(np.array(batch[self.id_column]))  # a copy: Ray's arrays are read-only
        else:
            ids = torch.tensor([self.paths[p] for p in batch["path"]])
        return images.contiguous().to(self.device), ids.to(torch.int64)


def _model_on(model_fn, device):
    model = model_fn()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fn: expected a function returning an nn.Module, got {type(model).__name__}")
    return model.to(device)


class _TopKActor:
    """Keeps a ``TopKPatches`` (model, hooks and fingerprint built once) and emits each batch's
    state, so a restarted actor loses nothing that was not already emitted."""

    def __init__(self, model_fn, layers, k, channels, backend, rows):
        self.rows = rows
        self.run = TopKPatches(_model_on(model_fn, rows.device), layers, k=k, channels=channels, backend=backend)
        self.empty = self.run.state_dict()

    def __call__(self, batch: dict) -> dict:
        images, ids = self.rows(batch)
        self.run.load_state_dict(self.empty)
        self.run.update(images, ids.to(images.device))
        return {"state": np.array([pickle.dumps(self.run.state_dict())], dtype=object)}


def _map(ds, cls, kwargs, batch_size, num_actors, num_gpus_per_actor):
    _check_positive("batch_size", batch_size)
    _check_positive("num_actors", num_actors)
    if num_gpus_per_actor < 0:
        raise ValueError(f"num_gpus_per_actor: expected >= 0, got {num_gpus_per_actor!r}")
    ray = _ray()
    from ray.data import ActorPoolStrategy
    from ray.data.dataset import MaterializedDataset
    if not isinstance(ds, MaterializedDataset) and num_actors >= ray.cluster_resources().get("CPU", 0):
        # the actors (one CPU each) would leave no CPU for the dataset's own read tasks, and
        # Ray Data would wait for one forever: read it into the object store first
        ds = ds.materialize()
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                          compute=ActorPoolStrategy(size=num_actors), num_gpus=num_gpus_per_actor,
                          batch_format="numpy")


def top_k_patches_ray(ds, model_fn, layers, k: int = 9, channels=None, *, batch_size: int = 64,
                      num_actors: int = 1, num_gpus_per_actor: float = 0, image_column: str = "image",
                      id_column: str = "id", device=None, backend=None) -> dict:
    """``top_k_patches`` over a Ray Dataset: ``{layer name: TopKResult}``, equal to the
    single-process run over the same images and ids (values, ids and positions; ties broken
    by value, id, position in both).

    ds: a ``ray.data.Dataset`` (rows: see the module docstring). model_fn: a picklable
    function returning the model (in eval mode), called once in each actor and once here
    (the driver checks the layers and merges the states, which carry the model's
    fingerprint). layers, k, channels, backend: as ``TopKPatches``; layers by name.
    device: the actors' device (default: CUDA when the actor sees a GPU, else CPU).
    Each batch's state is merged here as it arrives (``TopKPatches.merge``), so the driver
    holds ``3 * C * k`` numbers per layer, whatever the dataset's size.
    """
    _ray()
    run = TopKPatches(_model_on(model_fn, "cpu"), layers, k=k, channels=channels, backend=backend)
    rows = _Rows(image_column, id_column, _id_lookup(ds, id_column, image_column), device)
    states = _map(ds, _TopKActor, dict(model_fn=model_fn, layers=run.layers, k=k, channels=channels,
                                       backend=backend, rows=rows), batch_size, num_actors, num_gpus_per_actor)
    for batch in states.iter_batches(batch_size=None, batch_format="numpy"):
        for blob in batch["state"]:
            run.merge(pickle.loads(blob))
    return run.result()


class _EmbedActor:
    """Embeds a batch with ``embed`` and writes it as one shard named by its ids."""

    def __init__(self, model_fn, layer, pool, rows, shards):
        self.rows, self.layer, self.pool, self.shards = rows, layer, pool, Path(shards)
        self.model = _model_on(model_fn, rows.device)

    def __call__(self, batch: dict) -> dict:
        images, ids = self.rows(batch)
        vectors = embed(self.model, images, self.layer, pool=self.pool, batch_size=len(images),
                        progress=False).vectors
        # the name depends on the ids only: a retried batch rewrites its own shard
        name = f"{hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:20]}.safetensors"
        write_embedding_shard(self.shards / name, vectors, ids)
        return {"shard": np.array([name]), "count": np.array([len(ids)]), "first": ids[:1].numpy(),
                "dim": np.array([vectors.shape[1]])}


def embed_ray(ds, model_fn, layer, *, out, pool: str = "avg", batch_size: int = 64, num_actors: int = 1,
              num_gpus_per_actor: float = 0, image_column: str = "image", id_column: str = "id",
              device=None) -> Path:
    """``embed`` over a Ray Dataset, written as embedding shards under ``out`` (a folder every
    actor can write: a shared filesystem on a multi-node cluster).

    Each batch becomes ``out/shards/<hash of its ids>.safetensors`` (``vectors`` float32
    ``[n, D]``, ``ids`` int64 ``[n]``), written atomically by the actor; then
    ``out/embeddings.json`` lists the shards (by first id), the layer, pool, dimension and
    count. Shards of an earlier run into ``out`` that this run did not write are removed.
    Read with ``load_embeddings(out)`` or ``FeatureIndex.from_shards(out)``. The vectors equal
    ``embed(model, images, layer, pool)``'s for the same images (same batch function).
    Returns the manifest's path.
    """
    _ray()
    if pool not in ("avg", "max", "none"):
        raise ValueError(f"pool: expected 'avg', 'max' or 'none', got {pool!r}")
    from ._hooks import layer_name, resolve_layer
    model = _model_on(model_fn, "cpu")
    layer = layer_name(model, resolve_layer(model, layer))
    root = Path(out)
    rows = _Rows(image_column, id_column, _id_lookup(ds, id_column, image_column), device)
    written = _map(ds, _EmbedActor, dict(model_fn=model_fn, layer=layer, pool=pool, rows=rows,
                                         shards=str((root / "shards").resolve())),
                   batch_size, num_actors, num_gpus_per_actor)
    listed = {}
    for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
        for name, count, first, dim in zip(batch["shard"], batch["count"], batch["first"], batch["dim"]):
            listed[str(name)] = (int(first), int(count), int(dim))
    if not listed:
        raise ValueError("ds: no images")
    names = sorted(listed, key=lambda n: listed[n][0])
    for stale in (root / "shards").glob("*.safetensors"):
        if stale.name not in listed:
            stale.unlink()
    manifest = {"format": _EMBEDDINGS_FORMAT, "layer": layer, "pool": pool,
                "dim": listed[names[0]][2], "count": sum(c for _, c, _ in listed.values()),
                "shards": [f"shards/{n}" for n in names]}
    path = root / EMBEDDINGS_MANIFEST
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


def load_embeddings(out) -> Embeddings:
    """All vectors of an ``embed_ray`` output, sorted by id: ``Embeddings(vectors [N, D]
    float32, ids int64 [N])``. Loads everything; ``FeatureIndex.from_shards`` streams instead."""
    root = Path(out)
    manifest = json.loads((root / EMBEDDINGS_MANIFEST).read_text())
    parts = [_read_shard(root / name) for name in manifest["shards"]]
    vectors = torch.cat([v for v, _ in parts])
    ids = torch.cat([i for _, i in parts])
    order = torch.argsort(ids)
    return Embeddings(vectors[order], ids[order])


# ----------------------------------------------------------------------------- explanations

def dataset_items(ds):
    """The images of a Ray Dataset as ``explain_dataset`` numbers them, with its ``label``
    column (ints) if any. With a ``path`` column: the paths sorted (as an image folder's
    files are), decoded from their files where they are explained. Else from the ``image``
    column alone: the rows in the dataset's order (read with Ray Data's ``preserve_order``),
    image ``i`` being row ``i``, named ``ray.data.Dataset#i``; the images go to Ray's object
    store as they come (``_RayImages``) and are used as they are, as a tensor file's
    (``size``/``crop`` do not apply)."""
    from .pipeline import ExplainError, _Data
    names = ds.schema().names
    if "path" not in names and "image" not in names:
        raise ExplainError(f"--data: the Ray Dataset needs an 'image' column (ray.data.read_images) or a 'path' "
                           f"column (read_images(..., include_paths=True) or from_items of paths); it has {names}")
    columns = ["path" if "path" in names else "image"] + (["label"] if "label" in names else [])
    if "path" not in names:
        return _row_items(ds, columns)
    rows = sorted(ds.select_columns(columns).take_all(), key=lambda r: Path(r["path"]))
    if not rows:
        raise ExplainError("--data: the Ray Dataset is empty")
    keys = [str(r["path"]) for r in rows]
    labels = [_label(r.get("label")) for r in rows]
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return _Data(keys, labels, source=f"ray.data.Dataset of {len(keys)} paths (sha256 {digest})")


def _label(value) -> int:
    return -1 if value is None else int(value)


class _RayImages:
    """An ``image`` column in the dataset's row order, as blocks in Ray's object store: what
    ``_Data.tensors`` offers (``shape`` ``[N, C, H, W]``, ``[i]`` -> float32 ``[C, H, W]``),
    with the blocks fetched where the images are used (an actor, a block at a time)."""

    def __init__(self, refs: list, starts: list, shape: tuple):
        self.refs, self.starts, self.shape = refs, starts, shape
        self._block = (None, None)

    def __getitem__(self, i: int) -> torch.Tensor:
        number = bisect.bisect_right(self.starts, i) - 1
        if self._block[0] != number:
            self._block = (number, _images(_ray().get(self.refs[number]), "image"))
        return self._block[1][i - self.starts[number]]

    def __getstate__(self):
        return dict(self.__dict__, _block=(None, None))


def _row_items(ds, columns):
    """``dataset_items`` of a Ray Dataset without paths: one pass over its rows in order,
    each block put in the object store (the digest of the bytes and labels names the data)."""
    from .pipeline import ExplainError, _Data
    ray = _ray()
    ordered = ray.data.Dataset.copy(ds.select_columns(columns), _deep_copy=True)  # the caller's context untouched
    ordered.context.execution_options.preserve_order = True
    refs, starts, labels, digest, shape, raw = [], [], [], hashlib.sha256(), None, None
    for batch in ordered.iter_batches(batch_size=None, batch_format="numpy"):
        x = _stacked(batch["image"], "image")
        if len(x) == 0:
            continue
        if raw is None:
            raw, shape = x.shape[1:], tuple(_images(x[:1], "image").shape[1:])
        elif x.shape[1:] != raw:
            raise ExplainError(f"--data: the Ray Dataset's images have several shapes ({list(raw)} and "
                               f"{list(x.shape[1:])}); resize them first (read_images(size=...))")
        starts.append(len(labels))
        refs.append(ray.put(x))
        digest.update(np.ascontiguousarray(x).tobytes())
        labels += [_label(v) for v in batch["label"]] if "label" in batch else [-1] * len(x)
    if not labels:
        raise ExplainError("--data: the Ray Dataset is empty")
    digest.update(json.dumps(labels).encode())
    n = len(labels)
    return _Data(list(range(n)), labels, tensors=_RayImages(refs, starts, (n, *shape)),
                 names=[f"ray.data.Dataset#{i}" for i in range(n)],
                 source=f"ray.data.Dataset of {n} images (sha256 {digest.hexdigest()})")


class _ExplainActor:
    """Builds the run's model once, then explains whole shards: decodes a shard's images (the
    same ``_Decoded`` as ``explain_dataset``), runs them in the same batches through
    ``_Run.explain`` and writes the shard atomically, so a retried shard rewrites its file."""

    def __init__(self, spec: dict):
        from .pipeline import _Run, load_model
        loaded = load_model(spec["model"], spec["weights"])
        if loaded.hash != spec["hash"]:
            raise RuntimeError("model_fn: built a model with other weights in the actor than on the driver; "
                               "it must build the same weights on every call")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.spec, self.logger = spec, logging.getLogger("cnnviz_fast.distributed")
        self.run = _Run(loaded.module.to(device), loaded, spec["items"], spec["methods"], spec["metric_fns"],
                        spec["metric_steps"], spec["mean"].to(device), spec["std"].to(device), spec["target"],
                        spec["k"], spec["store_dtype"], spec["overlay_root"], spec["probe"].to(device))
        self.run.repeat_probe()

    def __call__(self, batch: dict) -> dict:
        return {"shard": batch["shard"], "images": np.array([self._shard(int(s)) for s in batch["shard"]])}

    def _shard(self, number: int) -> int:
        from .pipeline import _collate, _Decoded, _ShardBuffer
        spec = self.spec
        n, size, step = len(spec["items"].keys), spec["shard_size"], spec["batch_size"]
        positions = list(range(number * size, min(n, (number + 1) * size)))
        decoded = _Decoded(spec["items"], positions, spec["size"], spec["crop"])
        shard = _ShardBuffer(number)
        for start in range(0, len(positions), step):
            batch = _collate([decoded[i] for i in range(start, min(start + step, len(positions)))])
            self.run.explain(shard, self.logger, *batch[:3])
        shard.flush(spec["writer"], self.logger)
        return len(positions)


def explain_shards_ray(address, writer, logger, run, job: dict, num_actors: int, num_gpus_per_actor: float,
                       progress: bool) -> None:
    """``explain_dataset``'s loop on Ray: every shard not yet on disk becomes one task of an
    actor pool (``_ExplainActor``); the driver only counts what comes back."""
    ray = _ray()
    if not ray.is_initialized():
        # "auto": a cluster `ray start` began on this machine (or RAY_ADDRESS), else a local one
        ray.init(address=None if address == "auto" else address)
    from tqdm import tqdm

    from .store import shard_path
    n = len(run.items.keys)
    todo = [s for s in range(math.ceil(n / job["shard_size"])) if not shard_path(writer.root, s).is_file()]
    logger.info("explain on Ray: %d of %d shards to do, %d actors", len(todo),
                math.ceil(n / job["shard_size"]), num_actors)
    if not todo:
        return
    spec = dict(job, hash=run.loaded.hash, items=run.items, methods=run.methods, metric_fns=run.metric_fns,
                metric_steps=run.metric_steps, target=run.target, k=run.k, store_dtype=run.store_dtype,
                overlay_root=run.overlay_root, mean=run.mean_t.cpu(), std=run.std_t.cpu(), probe=run.probe.cpu(),
                writer=writer)
    shards = ray.data.from_items([{"shard": s} for s in todo])
    done = _map(shards, _ExplainActor, {"spec": spec}, 1, num_actors, num_gpus_per_actor)
    left = sum(min(n, (s + 1) * job["shard_size"]) - s * job["shard_size"] for s in todo)
    with tqdm(total=n, initial=n - left, unit="img", desc="explain (ray)", disable=not progress) as bar:
        for batch in done.iter_batches(batch_size=None, batch_format="numpy"):
            for number, count in zip(batch["shard"], batch["images"]):
                logger.info("shard %05d: %d images (Ray)", number, count)
                bar.update(int(count))


def explain_dataset_ray(ds, model_fn, methods, *, out, batch_size: int = 32, num_actors: int = 1,
                        num_gpus_per_actor: float = 0, **options):
    """``explain_dataset`` over the images a Ray Dataset lists, on an actor pool: the same
    store (shards, ``index.parquet``, ``manifest.json``), readable by ``open_results``, with
    the same resume rule (complete shards are skipped; another configuration is refused).

    ds: a ``ray.data.Dataset`` with an ``image`` column (``ray.data.read_images(root)``:
    uint8 ``[H, W, C]``; or float ``[C, H, W]`` arrays) or a ``path`` column
    (``read_images(root, include_paths=True)``, ``ray.data.from_items([{"path": p}, ...])``),
    and an optional int ``label`` column. With paths, images are numbered by sorted path, as
    ``cnnviz explain`` numbers a folder's files, and decoded in the actors from their paths
    with the same code (resize, centre crop). Without: image ``i`` is the dataset's row
    ``i`` (its order as Ray Data gives it with ``preserve_order``, e.g. ``read_images``'s
    files in listing order), named ``ray.data.Dataset#i`` in the index, used as it is (one
    shape for all; ``size``/``crop`` do not apply), as the rows of a ``.pt`` tensor file
    are; the driver reads the rows once into Ray's object store and the actors fetch
    their shards' blocks. ``out`` must be on storage every node sees.
    model_fn: a picklable function returning the model with its weights, called on the
    driver (which checks the methods on it) and once per actor; the weights must be the
    same on every call (checked by hash). methods, out, batch_size and ``options`` (target,
    top_k, size, crop, mean, std, dtype, shard_size, metrics, overlays, overwrite, report,
    progress, ...): as ``explain_dataset``. Every shard runs in the batches the
    single-process run uses, through the same batch step, so the maps are the same.
    Ray must be initialized (``ray.init(...)``), or a local instance is started.
    Returns ``Results``.
    """
    from .pipeline import explain_dataset
    return explain_dataset(ds, out, methods, model=model_fn, batch_size=batch_size, ray="auto",
                           num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor, **options)
