"""Feature space: layer embeddings, a FAISS neighbour index, and PCA / t-SNE maps.

``embed`` streams a dataset through a model and pools one layer into ``[N, D]`` vectors;
``FeatureIndex`` stores them in a FAISS index (exact or approximate) with user ids and
answers k-nearest-neighbour queries; ``pca`` and ``tsne`` map them to 2-D for
``cnnviz_fast.embedding_plot``. Captum's similarity influence does the neighbour part
by brute force in memory; here FAISS (Johnson, Douze, Jegou 2017, "Billion-scale similarity
search with GPUs") scales it to millions of vectors.

Example (the embedded default model on held-out shapes)::

    from cnnviz_fast import FeatureIndex, embed, embedding_plot, neighbours_grid, tsne
    from cnnviz_fast.data import shapes
    from cnnviz_fast.models import shapes_cnn
    data = shapes(600, seed=1)
    emb = embed(shapes_cnn(), data.images, "avgpool", progress=False)    # [600, 64] float32
    index = FeatureIndex(emb.vectors.shape[1], metric="cosine").add(emb.vectors, emb.ids)
    index.save("shapes.fidx")
    found = FeatureIndex.load("shapes.fidx").search(emb.vectors[:8], k=6)  # ids [8, 6]; self first
    grid = neighbours_grid(data.images[:8], data.images[found.ids[:, 1:]])
    embedding_plot(tsne(emb.vectors), labels=data.labels, class_names=data.class_names).savefig("map.png")

faiss and openTSNE are imported inside the functions that need them, so
``import cnnviz_fast`` stays light (``pip install cnnviz-fast[features]`` brings them).
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write, remove_stale_temps
from .._checks import check_choice, check_input, check_model, check_number, check_tensor
from .._hooks import capture, explaining, resolve_layer
from .._precision import lowered
from .._progress import progress_bar

FORMAT_NAME = "cnnviz-fast.FeatureIndex"
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = ("l2", "cosine")
# Vectors sampled to measure recall when choosing nprobe / efSearch, and the recall asked for.
_TUNE_QUERIES = 500
_TUNE_K = 10


def _require(module: str, pip_name: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for cnnviz_fast feature space; install it with "
                          f"`pip install {pip_name}` (or `pip install cnnviz-fast[features]`)") from err


# ----------------------------------------------------------------------------- embeddings

class Embeddings(NamedTuple):
    """vectors: float32 ``[N, D]`` on the model's device; ids: int64 ``[N]`` tensor or list of str."""
    vectors: torch.Tensor
    ids: object


def _batches(data, batch_size):
    """(images, ids or None) from a tensor, an object with ``.batches(bs)``, or an iterable of
    tensors / (images, labels) / (images, labels, ids) tuples."""
    if isinstance(data, torch.Tensor):
        check_tensor("data", data, ndim=(2, 3, 4, 5))
        # an empty tensor still runs (an empty batch), so its result has the layer's width
        for start in range(0, data.shape[0], batch_size) if len(data) else [0]:
            yield data[start:start + batch_size], None
        return
    source = data.batches(batch_size) if hasattr(data, "batches") else data
    for batch in source:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            yield batch[0], (batch[2] if len(batch) >= 3 else None)
        else:
            raise TypeError("data: expected a tensor, an object with .batches(batch_size), or an iterable "
                            f"of image tensors or (images, labels[, ids]) tuples; got a batch of type "
                            f"{type(batch).__name__}")


def _image_count(data):
    """Images in ``data`` for the progress bar, or None where only the batch count is known."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    dataset = data if hasattr(data, "batches") else getattr(data, "dataset", None)   # a DataLoader's
    return len(dataset) if hasattr(dataset, "__len__") else None


def _pool(acts: torch.Tensor, pool: str) -> torch.Tensor:
    if acts.dim() <= 2 or pool == "none":
        return acts.flatten(1)
    dims = tuple(range(2, acts.dim()))
    return acts.mean(dims) if pool == "avg" else acts.amax(dims)


@torch.no_grad()
def embed(model: nn.Module, data, layer, pool: str = "avg", batch_size: int = 64,
          progress: bool | None = None, *, compute_dtype: torch.dtype | None = None,
          channels_last: bool | None = None) -> Embeddings:
    """One vector per image: the output of ``layer`` pooled over its spatial axes.

    data: an image tensor ``[N, C, H, W]``, an object with ``.batches(batch_size)`` (such as
    ``cnnviz_fast.data.image_folder``), or any iterable of batches (image tensors or
    ``(images, labels[, ids])`` tuples, e.g. a ``DataLoader``). Batches are moved to the
    model's device one at a time, so datasets larger than memory stream through; each is
    checked as the methods check ``x`` (dtype, finite values, shape the model takes).
    pool: ``"avg"`` (global average, the penultimate vector of GAP networks), ``"max"``, or
    ``"none"`` (flatten ``C*H*W``). Activations already ``[B, D]`` are taken as they are.
    progress: a tqdm bar of images on stderr; None (default) shows it on an interactive
    terminal once the run has taken a few seconds (``cnnviz_fast._progress``).
    compute_dtype / channels_last: the layers run on a copy converted once for the call
    (``cnnviz_fast._precision``; by default on CPU channels-last with batch norms folded, the
    layer's own output kept; ``channels_last=False``: the model as given); activations are
    pooled in the images' dtype. bfloat16
    vectors keep neighbour rankings but not exact distances.

    Returns ``Embeddings(vectors, ids)``: float32 ``[N, D]`` on the model's device, and the
    ids the data carried (a list) or, where it carried none, ``arange(N)`` (int64). An empty
    image tensor gives ``[0, D]`` vectors.
    The model runs in eval mode under ``torch.no_grad`` and is left as found (mode restored,
    hooks removed).
    """
    check_model(model)
    check_choice("pool", pool, ("avg", "max", "none"))
    check_number("batch_size", batch_size, 1, integer=True)
    module = resolve_layer(model, layer)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks, ids, count = [], [], 0
    with explaining(model), progress_bar(progress, "embed", _image_count(data), "img") as bar:
        for images, batch_ids in _batches(data, batch_size):
            images = check_input(model, images.to(device), "data", ndim=images.dim())
            runs, counterpart = lowered(model, images, compute_dtype, channels_last, keep=(module,))
            with capture(runs, counterpart(module)) as record:
                runs(images)
            chunks.append(_pool(record[counterpart(module)].to(images.dtype), pool).float())
            n = images.shape[0]
            if batch_ids is None:
                ids.extend(range(count, count + n))
            else:
                ids.extend(batch_ids.tolist() if isinstance(batch_ids, torch.Tensor) else list(batch_ids))
            count += n
            bar.update(n)
    if not chunks:
        raise ValueError("data: no images")
    out_ids = torch.tensor(ids, dtype=torch.int64) if all(isinstance(i, int) for i in ids) else ids
    return Embeddings(torch.cat(chunks), out_ids)


# ----------------------------------------------------------------------------- the index

class Neighbours(NamedTuple):
    """distances: float32 ``[Q, k]`` (squared L2, or ``1 - cos`` for cosine), ascending;
    ids: int64 ``[Q, k]`` tensor (``-1`` where fewer than k were found) or, for string ids,
    a list of Q lists of str (``None`` where missing). Both on the queries' device; numpy arrays
    (float32 and int64, as FAISS returns them) for numpy queries."""
    distances: torch.Tensor
    ids: object


def _as_tensor(name: str, x):
    """``x`` as a tensor (numpy arrays as FAISS, scikit-learn and openTSNE users pass them, viewed
    without a copy) and whether it came as numpy, so results can go back as numpy."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False


def _as_float32_numpy(name: str, x, dim: int, cosine: bool) -> np.ndarray:
    x, _ = _as_tensor(name, x)
    check_tensor(name, x, ndim=2)
    if x.shape[1] != dim:
        raise ValueError(f"{name}: expected vectors of dimension {dim}, got shape {tuple(x.shape)}")
    x = x.detach()
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise ValueError(f"{name}: row {row} holds NaN or infinite values")
    x = x.float()
    if cosine:
        norms = x.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            row = int((norms[:, 0] == 0).nonzero()[0])
            raise ValueError(f"{name}: row {row} has zero norm, which has no cosine direction")
        x = x / norms
    return np.ascontiguousarray(x.cpu().numpy())


class FeatureIndex:
    """k-nearest-neighbour index over ``dim``-dimensional vectors, on FAISS.

    metric: ``"l2"`` (distances are squared Euclidean, as FAISS returns them) or ``"cosine"``
    (vectors are L2-normalized, searched with L2, and distances reported as ``1 - cos``,
    since ``|a - b|^2 = 2 - 2 cos`` for unit vectors).
    kind: ``"flat"`` exact search; ``"ivf"`` inverted lists of full vectors (IndexIVFFlat);
    ``"ivfpq"`` inverted lists of product-quantized codes (IndexIVFPQ, ``pq_m`` sub-vectors
    of 8 bits: compact, its recall is capped by the quantization); ``"hnsw"`` graph
    (IndexHNSWFlat, 32 links); ``"auto"`` picks by the rule below.

    **The auto rule.** Below ``flat_max`` vectors (50,000 by default) the index is exact
    flat search: there, 1,000 queries at D=512 cost ~50 GFLOP (about a second on two cores),
    less than training an IVF index and measuring it would, and the answers are exact.
    At ``flat_max`` vectors or more it is IndexIVFFlat with ``nlist = round(2 * sqrt(N))``
    lists (at most N/4; the low end of FAISS's 1-16 sqrt(N) guidance, to keep k-means training, on
    ``32 * nlist`` sampled vectors, near 15 s at 1M vectors on two cores), and ``nprobe`` is
    *measured*, not assumed: 500 of the added vectors are drawn at random, their exact 10
    nearest neighbours among the other vectors found by flat search, and nprobe is the
    smallest value (powers of two, then a bisection) whose recall@10 on that sample is
    >= ``target_recall`` (0.95). The measured recall is kept in ``measured_recall``. The same
    measurement picks nprobe for ``"ivf"``/``"ivfpq"`` and efSearch for ``"hnsw"`` unless
    ``nprobe``/``ef_search`` is given.

    Building is lazy: ``add`` stores vectors in an exact flat index; the first ``search``,
    ``save`` or ``build`` after adds trains and fills the approximate index (for auto, also
    each time the count first reaches ``flat_max``). Vectors added after that go straight
    into the built index, which keeps its measured nprobe.

    ids: each ``add`` takes int64 ids (>= 0; ``-1`` marks a missing result, as in FAISS) or
    strings, one kind per index, unique; without ids the running position is used.
    GPU: when faiss was built with GPU support and the vectors of the first ``add`` are on
    CUDA, the flat and IVF indexes are cloned to GPU 0 (inputs still pass through host
    memory). faiss-cpu has no GPU support, so that path is untested here.
    """

    def __init__(self, dim: int, metric: str = "l2", kind: str = "auto", *, nlist: int | None = None,
                 nprobe: int | None = None, ef_search: int | None = None, pq_m: int | None = None,
                 flat_max: int = 50_000, target_recall: float = 0.95, seed: int = 0):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search), ("pq_m", pq_m)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
        if pq_m is not None and dim % pq_m:
            raise ValueError(f"pq_m: must divide dim={dim}, got {pq_m}")
        if not isinstance(flat_max, int) or isinstance(flat_max, bool) or flat_max < 1:
            raise ValueError(f"flat_max: expected an int >= 1, got {flat_max!r}")
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall: expected a value in (0, 1], got {target_recall}")
        _require("faiss", "faiss-cpu")
        self.dim, self.metric, self.kind = dim, metric, kind
        self.settings = dict(nlist=nlist, nprobe=nprobe, ef_search=ef_search, pq_m=pq_m, flat_max=flat_max,
                             target_recall=target_recall, seed=seed)
        self.built_kind = None      # the kind actually built ("flat" for a small auto index)
        self.measured_recall = None
        self._index = None          # the searchable index once built
        self._staging = None        # exact flat index holding vectors added before the build
        self._ids = []              # user id per position: np.int64 chunks, or str
        self._id_kind = None        # "int" | "str"
        self._seen = set()
        self._gpu = False
        self._knob = None           # nprobe or efSearch in use

    # -- sizes and knobs
    def __len__(self):
        return sum(x.ntotal for x in (self._index, self._staging) if x is not None)

    @property
    def nprobe(self):
        """The IVF nprobe (or HNSW efSearch) in use; None for flat or before the build."""
        return self._knob

    def _set_knob(self, value: int):
        faiss = _require("faiss", "faiss-cpu")
        space = faiss.GpuParameterSpace() if self._gpu and self.built_kind != "hnsw" else faiss.ParameterSpace()
        space.set_index_parameter(self._index, "efSearch" if self.built_kind == "hnsw" else "nprobe", int(value))
        self._knob = int(value)

    # -- adding
    def add(self, vectors, ids=None) -> "FeatureIndex":
        """Add float ``[n, dim]`` vectors (a tensor on any device or a numpy array; finite) with
        ``n`` ids: an int64 tensor or array, a sequence of ints or of str, or None for the running
        positions."""
        faiss = _require("faiss", "faiss-cpu")
        vectors, _ = _as_tensor("vectors", vectors)
        x = _as_float32_numpy("vectors", vectors, self.dim, self.metric == "cosine")
        n = x.shape[0]
        new_ids, kind, fresh = self._check_ids(ids, n)
        if len(self) == 0 and vectors.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu = True
        if self._index is None and self._staging is None:
            self._staging = self._to_device(faiss.IndexFlatL2(self.dim))
        (self._staging if self._index is None else self._index).add(x)
        self._id_kind = kind
        self._ids.append(new_ids)
        self._seen |= fresh     # only once faiss took the vectors, so a failed add leaves no trace
        return self

    def _check_ids(self, ids, n):
        if ids is None:
            if self._id_kind == "str":
                raise ValueError("ids: this index holds string ids; pass n strings")
            values, kind = np.arange(len(self), len(self) + n, dtype=np.int64), "int"
        elif isinstance(ids, torch.Tensor):
            if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise TypeError(f"ids: expected an integer tensor, got {ids.dtype}")
            values = ids.detach().cpu().reshape(-1).to(torch.int64).numpy()
            kind = "int"
        else:
            values = list(ids)
            if all(isinstance(i, str) for i in values):
                kind = "str"
            elif all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in values):
                values, kind = np.asarray(values, dtype=np.int64).reshape(-1), "int"
            else:
                raise TypeError("ids: expected all ints or all strings")
        if len(values) != n:
            raise ValueError(f"ids: expected {n} ids for {n} vectors, got {len(values)}")
        if self._id_kind is not None and kind != self._id_kind:
            raise TypeError(f"ids: this index holds {self._id_kind} ids, got {kind} ids")
        if kind == "int" and n and int(values.min()) < 0:
            raise ValueError("ids: int ids must be >= 0 (-1 marks a missing neighbour)")
        listed = values.tolist() if kind == "int" else values
        fresh = set(listed)
        if len(fresh) != n or not self._seen.isdisjoint(fresh):
            dup = next(i for i in listed if i in self._seen or listed.count(i) > 1)
            raise ValueError(f"ids: duplicate id {dup!r}")
        return values, kind, fresh

    # -- building
    def _to_device(self, index):
        if not self._gpu:
            return index
        faiss = _require("faiss", "faiss-cpu")
        if not hasattr(self, "_gpu_res"):
            self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def _needs_build(self):
        if self._staging is not None:
            return True
        return self.kind == "auto" and self.built_kind == "flat" and len(self) >= self.settings["flat_max"]

    def _kind_for(self, n):
        if self.kind != "auto":
            return self.kind
        return "flat" if n < self.settings["flat_max"] else "ivf"

    def build(self) -> "FeatureIndex":
        """Train and fill the index from the vectors added so far (done by search/save too)."""
        if not self._needs_build():
            return self
        faiss = _require("faiss", "faiss-cpu")
        # before the first build vectors wait in the staging flat index; an auto index outgrowing
        # flat_max is itself flat: either is the exact ground truth for the recall measurement
        exact = self._staging if self._staging is not None else self._index
        self._staging, self._index = None, None
        n = exact.ntotal
        kind = self.built_kind = self._kind_for(n)
        if kind == "flat":
            self._index, self.measured_recall = exact, 1.0
            return self
        index = self._new_index(kind, n)
        if kind in ("ivf", "ivfpq"):
            index.train(self._sample(exact, self._train_size(kind, index, n)))
        for start in range(0, n, 65536):
            index.add(self._reconstruct(exact, start, min(n, start + 65536)))
        self._index = self._to_device(index) if kind != "hnsw" else index
        self._finish_build(self._tuning_sample(exact), index.nlist if kind != "hnsw" else None)
        return self

    def _finish_build(self, sample, nlist):
        """Set nprobe / efSearch as given, or measure it on ``sample`` (see ``_tuning_sample``)."""
        knob = self.settings["ef_search" if self.built_kind == "hnsw" else "nprobe"]
        if knob is not None:
            self._set_knob(knob)
            self.measured_recall = self._recall(sample)
        else:
            self._tune(sample, nlist)

    def _new_index(self, kind, n):
        faiss = _require("faiss", "faiss-cpu")
        d = self.dim
        if kind == "hnsw":
            return faiss.IndexHNSWFlat(d, 32)
        nlist = self.settings["nlist"] or max(1, min(n // 4, round(2 * math.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            m = self.settings["pq_m"] or max(k for k in range(1, min(64, max(1, d // 4)) + 1) if d % k == 0)
            if n < 256:
                raise ValueError(f"kind='ivfpq' needs at least 256 vectors to train its 8-bit codebooks, got {n}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8)
        index.cp.min_points_per_centroid = 1   # sample sizes are chosen here; silence faiss's warning
        if kind == "ivfpq":
            index.pq.cp.min_points_per_centroid = 1
        index.cp.seed = self.settings["seed"]
        index.own_fields = True
        quantizer.this.disown()
        return index

    @staticmethod
    def _reconstruct(flat, start, stop):
        return flat.reconstruct_n(start, stop - start)

    def _train_size(self, kind, index, n):
        # 32 points per list; PQ codebooks (256 centroids each) want 39 * 256 points
        return min(n, max(32 * index.nlist, 9984 if kind == "ivfpq" else 0))

    def _sample_rows(self, n, size, offset=0):
        rng = np.random.default_rng(self.settings["seed"] + offset)
        return np.sort(rng.choice(n, size=size, replace=False))

    def _sample(self, flat, size):
        rows = self._sample_rows(flat.ntotal, size)
        return flat.reconstruct_batch(rows) if size < flat.ntotal else self._reconstruct(flat, 0, flat.ntotal)

    def _tuning_sample(self, exact):
        """Held-out queries (drawn from the added vectors) and their exact neighbours, self excluded."""
        n = exact.ntotal
        k = min(_TUNE_K, n - 1)
        rows = self._sample_rows(n, min(_TUNE_QUERIES, n), offset=1)
        queries = exact.reconstruct_batch(rows)
        _, truth = exact.search(queries, k + 1)
        return queries, rows, k, _drop_self(truth, rows, k)

    def _recall(self, sample):
        queries, rows, k, truth = sample
        if k < 1:
            return 1.0
        _, found = self._index.search(queries, k + 1)
        found = _drop_self(found, rows, k)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))

    def _tune(self, sample, nlist):
        """Smallest nprobe / efSearch reaching target_recall on the held-out sample."""
        target = self.settings["target_recall"]
        if self.built_kind == "hnsw":
            candidates = [16, 32, 64, 128, 256, 512, 1024]
        else:
            candidates = sorted({min(nlist, 2 ** p) for p in range(int(math.log2(nlist)) + 2)})
        results = {}

        def measure(value):
            self._set_knob(value)
            results[value] = self._recall(sample)
            return results[value] >= target

        low = None
        for value in candidates:
            if measure(value):
                break
            low = value
        high = value
        if results[high] >= target and low is not None:
            while high - low > 1:   # bisect between the last failing and the first passing power of two
                mid = (low + high) // 2
                if measure(mid):
                    high = mid
                else:
                    low = mid
        best = high if results[high] >= target else max(results, key=lambda v: (results[v], -v))
        self._set_knob(best)
        self.measured_recall = results[best]

    # -- searching
    def search(self, queries, k: int = 10) -> Neighbours:
        """The ``k`` nearest stored vectors of each query row ``[Q, dim]`` (finite floats; a tensor,
        or a numpy array as FAISS takes them, which gives numpy ``distances`` and int ``ids``)."""
        queries, numpy_in = _as_tensor("queries", queries)
        n = len(self)
        if n == 0:
            raise ValueError("search: the index is empty; add vectors first")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if k > n:
            raise ValueError(f"k: asked for {k} neighbours but the index holds only {n} vectors")
        q = _as_float32_numpy("queries", queries, self.dim, self.metric == "cosine")
        self.build()
        dist, pos = self._index.search(q, k)
        dist = torch.from_numpy(dist)
        missing = torch.from_numpy(pos < 0)
        if self.metric == "cosine":
            dist = dist / 2
        dist = dist.masked_fill(missing, float("inf")).to(queries.device)
        table = self._id_table()
        if numpy_in:
            dist = dist.numpy()
        if self._id_kind == "str":
            return Neighbours(dist, [[table[p] if p >= 0 else None for p in row] for row in pos.tolist()])
        ids = np.where(pos >= 0, table[np.maximum(pos, 0)], -1)
        return Neighbours(dist, ids if numpy_in else torch.from_numpy(ids).to(queries.device))

    def _id_table(self):
        if self._id_kind == "str":
            if len(self._ids) != 1 or not isinstance(self._ids[0], list):
                self._ids = [[s for chunk in self._ids for s in chunk]]
            return self._ids[0]
        if len(self._ids) != 1:
            self._ids = [np.concatenate(self._ids)]
        return self._ids[0]

    # -- saving
    def save(self, path) -> Path:
        """Write index, ids and settings to one file, atomically (temp file + ``os.replace``):
        a failed save leaves any existing file untouched."""
        faiss = _require("faiss", "faiss-cpu")
        if len(self) == 0:
            raise ValueError("save: the index is empty")
        self.build()
        path = Path(path)
        index = faiss.index_gpu_to_cpu(self._index) if self._gpu and self.built_kind != "hnsw" else self._index
        header = dict(format=FORMAT_NAME, version=FORMAT_VERSION, dim=self.dim, metric=self.metric,
                      kind=self.kind, built_kind=self.built_kind, settings=self.settings,
                      measured_recall=self.measured_recall, nprobe=self.nprobe, id_kind=self._id_kind)
        table = self._id_table()
        arrays = dict(header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                      index=faiss.serialize_index(index))
        if self._id_kind == "str":
            encoded = [s.encode("utf-8") for s in table]
            arrays["id_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            arrays["id_offsets"] = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        else:
            arrays["ids"] = table
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "FeatureIndex":
        """Read a file written by ``save``; the loaded index gives exactly the same answers.
        A corrupt file or one of another format version raises ``ValueError``."""
        faiss = _require("faiss", "faiss-cpu")
        path = Path(path)
        remove_stale_temps(path)  # of a save killed midway
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such FeatureIndex file")
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):    # a bare .npy array
                raise ValueError("not an npz archive")
            with loaded as npz:
                arrays = {name: npz[name] for name in npz.files}
            header = json.loads(arrays["header"].tobytes().decode())
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a cnnviz-fast FeatureIndex file, or it is corrupt ({err})") from err
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a cnnviz-fast FeatureIndex file")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: written in FeatureIndex format version {header.get('version')}; "
                             f"this cnnviz-fast reads version {FORMAT_VERSION}")
        try:
            self = cls(header["dim"], header["metric"], header["kind"], **header["settings"])
            self._index = faiss.deserialize_index(arrays["index"])
            self.built_kind, self.measured_recall = header["built_kind"], header["measured_recall"]
            if header["nprobe"] is not None:
                self._set_knob(header["nprobe"])
            self._id_kind = header["id_kind"]
            if self._id_kind == "str":
                raw, offsets = arrays["id_bytes"].tobytes(), arrays["id_offsets"]
                self._ids = [[raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]]
            else:
                self._ids = [arrays["ids"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:   # faiss raises RuntimeError
            raise ValueError(f"{path}: the FeatureIndex inside is corrupt ({err!r})") from err
        table = self._ids[0]
        if len(table) != self._index.ntotal or self._index.d != self.dim:
            raise ValueError(f"{path}: {len(table)} ids for {self._index.ntotal} vectors of dimension "
                             f"{self._index.d}; the file is corrupt")
        self._seen = set(table.tolist() if self._id_kind == "int" else table)
        return self

    @classmethod
    def from_shards(cls, shards, metric: str = "l2", kind: str = "auto", **settings) -> "FeatureIndex":
        """An index over embedding shards (``cnnviz_fast.distributed.embed_ray``'s folder, or a
        list of its ``.safetensors`` shard files), built without holding all vectors twice.

        The index type follows the rules of ``FeatureIndex(dim, metric, kind, **settings)``;
        an IVF index is trained on rows sampled across the shards (the rows ``build()`` would
        sample), then the shards are added one at a time, each read, added and dropped. nprobe
        / efSearch is measured as ``build()`` measures it, against exact neighbours found by
        scanning the shards one at a time. With the same vectors in the same order the index
        answers as ``FeatureIndex(...).add(all vectors, ids)`` does (an HNSW graph depends on
        how inserts are batched, so an HNSW index answers alike up to its measured recall).
        """
        faiss = _require("faiss", "faiss-cpu")
        paths = _shard_files(shards)
        sizes = [_shard_rows(p) for p in paths]
        n = sum(n for n, _ in sizes)
        if n == 0:
            raise ValueError(f"shards: no vectors in {len(paths)} shard files")
        dims = {d for _, d in sizes}
        if len(dims) != 1:
            raise ValueError(f"shards: vectors of dimensions {sorted(dims)}; expected one dimension")
        self = cls(dims.pop(), metric, kind, **settings)
        built = self.built_kind = self._kind_for(n)
        starts = np.cumsum([0] + [m for m, _ in sizes])
        cosine = self.metric == "cosine"

        def rows_of(rows):
            """The vectors at sorted global positions ``rows``, read shard by shard."""
            parts = []
            for path, lo, hi in zip(paths, starts[:-1], starts[1:]):
                mine = rows[(rows >= lo) & (rows < hi)] - lo
                if len(mine):
                    parts.append(_as_float32_numpy("vectors", _read_shard(path)[0][mine], self.dim, cosine))
            return np.concatenate(parts)

        index = faiss.IndexFlatL2(self.dim) if built == "flat" else self._new_index(built, n)
        if built in ("ivf", "ivfpq"):
            size = self._train_size(built, index, n)
            index.train(rows_of(self._sample_rows(n, size) if size < n else np.arange(n)))
        for path in paths:
            vectors, ids = _read_shard(path)
            x = _as_float32_numpy("vectors", vectors, self.dim, cosine)
            new_ids, self._id_kind, fresh = self._check_ids(ids, len(x))
            index.add(x)
            self._ids.append(new_ids)
            self._seen |= fresh
        self._index = index
        if built == "flat":
            self.measured_recall = 1.0
            return self
        rows = self._sample_rows(n, min(_TUNE_QUERIES, n), offset=1)
        queries, k = rows_of(rows), min(_TUNE_K, n - 1)
        best_d = np.full((len(rows), k + 1), np.inf, dtype=np.float32)
        best_i = np.full((len(rows), k + 1), -1, dtype=np.int64)
        for path, lo in zip(paths, starts[:-1]):   # exact neighbours, one shard at a time
            x = _as_float32_numpy("vectors", _read_shard(path)[0], self.dim, cosine)
            d, i = faiss.knn(queries, x, min(k + 1, len(x)))
            d, i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + lo], 1)
            order = np.argsort(d, axis=1, kind="stable")[:, :k + 1]
            best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        self._finish_build((queries, rows, k, _drop_self(best_i, rows, k)),
                           index.nlist if built != "hnsw" else None)
        return self

    def __repr__(self):
        built = f", built={self.built_kind!r}, nprobe={self.nprobe}" if self.built_kind else ""
        return f"FeatureIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, n={len(self)}{built})"


SHARD_VECTORS, SHARD_IDS = "vectors", "ids"


def write_embedding_shard(path, vectors: torch.Tensor, ids) -> None:
    """One embedding shard, atomically: safetensors with ``vectors`` float32 ``[n, D]`` and
    ``ids`` int64 ``[n]`` (string ids go to the metadata as a JSON list)."""
    from safetensors.torch import save
    tensors = {SHARD_VECTORS: vectors.detach().float().cpu().contiguous()}
    metadata = {}
    if isinstance(ids, torch.Tensor):
        tensors[SHARD_IDS] = ids.detach().to(torch.int64).cpu().contiguous()
    else:
        metadata[SHARD_IDS] = json.dumps(list(ids))
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))


def _read_shard(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        vectors = f.get_tensor(SHARD_VECTORS)
        ids = f.get_tensor(SHARD_IDS) if SHARD_IDS in f.keys() else json.loads(f.metadata()[SHARD_IDS])
    return vectors, ids


def _shard_rows(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice(SHARD_VECTORS).get_shape())


def _shard_files(shards) -> list:
    """The shard files of an ``embed_ray`` folder (in its manifest's order) or of a list."""
    if isinstance(shards, (str, Path)):
        root = Path(shards)
        manifest = root / "embeddings.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"shards: {root} holds no embeddings.json (not an embed_ray output)")
        paths = [root / name for name in json.loads(manifest.read_text())["shards"]]
    else:
        paths = [Path(p) for p in shards]
    if not paths:
        raise ValueError("shards: expected at least one shard file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards: missing shard files {missing[:3]}")
    return paths


def _drop_self(neighbours: np.ndarray, rows: np.ndarray, k: int) -> list:
    """Each row's neighbours without the query's own position, first k."""
    return [[p for p in row if p != r][:k] for row, r in zip(neighbours.tolist(), rows.tolist())]


# ----------------------------------------------------------------------------- 2-D maps

def pca(x: torch.Tensor, n: int = 2, method: str = "auto", seed: int = 0) -> torch.Tensor:
    """Principal-component scores ``[N, n]`` of ``x`` ``[N, D]``, on ``x``'s device and dtype
    (a numpy array in, as scikit-learn takes it: a numpy array out).

    Scores are ``(x - mean) @ V[:, :n]`` with V from the SVD of the centred data, as
    scikit-learn's ``PCA(n).fit_transform`` (signs fixed so each component's largest
    loading is positive, scikit-learn's ``svd_flip`` rule on V). method: ``"exact"``
    (``torch.linalg.svd``), ``"randomized"`` (Halko et al. 2011 through ``torch.svd_lowrank``,
    ``n + 10`` columns, 4 power iterations) or ``"auto"`` (randomized when
    ``min(N, D) > 500`` and ``n < 0.8 min(N, D)``, scikit-learn's rule).
    """
    x, numpy_in = _as_tensor("x", x)
    check_tensor("x", x, ndim=2)
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'randomized', got {method!r}")
    rows, cols = x.shape
    if not isinstance(n, int) or n < 1 or n > min(rows, cols):
        raise ValueError(f"n: expected an int in [1, {min(rows, cols)}] for x of shape {tuple(x.shape)}, got {n!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: holds NaN or infinite values")
    x = x.detach()
    mean = x.mean(0, keepdim=True)
    if method == "auto":
        method = "randomized" if min(rows, cols) > 500 and n < 0.8 * min(rows, cols) else "exact"
    if method == "exact":
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        v = vh[:n].T
    else:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(x, q=min(n + 10, rows, cols), niter=4, M=mean)
        v = v[:, :n]
    signs = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    scores = (x - mean) @ (v * signs)
    return scores.numpy() if numpy_in else scores


def tsne(x: torch.Tensor, perplexity: float = 30.0, n_iter: int = 500, early_exaggeration_iter: int = 250,
         seed: int = 0, n_jobs: int = -1, **kwargs) -> torch.Tensor:
    """t-SNE map ``[N, 2]`` of ``x`` ``[N, D]`` through openTSNE (Policar et al. 2024;
    FFT-accelerated interpolation of Linderman et al. 2019, approximate neighbours), float32
    on ``x``'s device (a numpy array in, as openTSNE takes it: a numpy array out). Defaults
    are openTSNE's (PCA initialization, learning rate N/12, 250 exaggerated + 500 normal
    iterations); ``kwargs`` go to ``openTSNE.TSNE``. The computation itself runs on the CPU.
    """
    x, numpy_in = _as_tensor("x", x)
    check_tensor("x", x, ndim=2)
    if x.shape[0] < 4:
        raise ValueError(f"x: t-SNE needs at least 4 points, got {x.shape[0]}")
    if not 0 < perplexity < x.shape[0]:
        raise ValueError(f"perplexity: expected a value in (0, {x.shape[0]}), got {perplexity}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: holds NaN or infinite values")
    openTSNE = _require("openTSNE", "openTSNE")
    data = x.detach().cpu().double().numpy()
    # openTSNE lowers a perplexity above (N - 1) / 3 with a warning; do it quietly and say so here.
    perplexity = min(perplexity, (x.shape[0] - 1) / 3)
    model = openTSNE.TSNE(n_components=2, perplexity=perplexity, n_iter=n_iter,
                          early_exaggeration_iter=early_exaggeration_iter, random_state=seed, n_jobs=n_jobs,
                          negative_gradient_method="fft", **kwargs)
    points = np.asarray(model.fit(data), dtype=np.float32)
    return points if numpy_in else torch.from_numpy(points).to(x.device)
