"""The result store of ``cnnviz explain``: a folder other tools read.

Layout (``HOUSE_STYLE.md``)::

    DIR/
      manifest.json            command, config and its hash, versions, model hash, skipped files
      index.parquet            one row per image x method x target (pyarrow; pandas reads it)
      shards/00000.safetensors {method: [n, H, W] maps, "inputs": [m, 3, h, w] uint8 thumbnails}
      shards/00000.json        that shard's wall-clock timings (kept out of the shard itself so
                               the shard's bytes depend only on the data and the configuration)
      explain.log, report.html

A shard holds a fixed range of dataset positions (``shard_size`` of them); its safetensors
metadata holds the per-image records (path, label, prediction, scores, targets) and the files
skipped in that range, so a shard is complete on its own and the index is rebuilt from the
shards. Every file goes through ``atomic_write``: a shard exists only when complete, so a
re-run resumes after the last complete shard, and ``manifest.json``'s config hash refuses a
different configuration unless ``overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ._atomic import atomic_write

MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARDS = "shards"
INPUTS = "inputs"  # the shard tensor of input thumbnails, one per image (not per target)


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the result store needs {module.split('.')[0]} "
                          f"(pip install safetensors pyarrow): {err}") from err


def config_hash(config: dict) -> str:
    """sha256 of the configuration's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def shard_path(root: Path, number: int) -> Path:
    return Path(root) / SHARDS / f"{number:05d}.safetensors"


def write_json(path: Path, data: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)


class StoreError(ValueError):
    """A store that cannot be written as asked (another configuration's, or not a store)."""


class StoreWriter:
    """Writes one store; ``complete_shards`` says where a resumed run starts."""

    def __init__(self, root, config: dict, manifest: dict, overwrite: bool = False):
        self.root = Path(root)
        config = json.loads(json.dumps(config, default=str))  # compared as it reads back (tuples are lists)
        self.hash = config_hash(config)
        existing = self.root / MANIFEST
        if existing.is_file():
            old = json.loads(existing.read_text())
            if old.get("config_hash") != self.hash:
                if not overwrite:
                    changed = sorted(k for k in set(config) | set(old.get("config", {}))
                                     if config.get(k) != old.get("config", {}).get(k))
                    raise StoreError(f"--out: {self.root} holds results of a different configuration "
                                     f"(changed: {', '.join(changed) or 'model'}); pass --overwrite to replace them")
                self._clear()
        elif overwrite:
            self._clear()
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise StoreError(f"--out: {self.root} exists and is not a result store; pick an empty folder "
                             "or pass --overwrite")
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temps = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for p in self.removed_temps:  # a killed run's half-written files
            p.unlink()
        self.manifest = dict(manifest, config=config, config_hash=self.hash)
        write_json(existing, self.manifest)

    def _clear(self) -> None:
        for name in (MANIFEST, INDEX, "report.html", "explain.log"):
            (self.root / name).unlink(missing_ok=True)
        for name in (SHARDS, "overlays"):
            shutil.rmtree(self.root / name, ignore_errors=True)

    def complete_shards(self) -> int:
        """How many shards, from 0 on without a gap, are on disk (a resumed run starts there)."""
        n = 0
        while shard_path(self.root, n).is_file():
            n += 1
        return n

    def write_shard(self, number: int, maps: dict, records: list, skipped: list, timings: dict) -> None:
        """``maps``: {name: tensor}; ``records``: per-image dicts; ``skipped``: [path, reason]."""
        st = _need("safetensors.torch")
        write_json(shard_path(self.root, number).with_suffix(".json"), {"seconds": timings})
        data = st.save({k: v.contiguous() for k, v in maps.items()},
                       # one key: safetensors writes metadata from a hash map, in no fixed order
                       metadata={"shard": json.dumps({"records": records, "skipped": skipped}, sort_keys=True)})
        with atomic_write(shard_path(self.root, number)) as f:
            f.write(data)

    def finish(self, methods: list, extra: dict) -> "Results":
        """Rebuild ``index.parquet`` from the shards and complete the manifest."""
        results = Results(self.root, check=False)
        table = results._build_index(methods)
        pq = _need("pyarrow.parquet")
        with atomic_write(self.root / INDEX) as f:
            pq.write_table(table, f)
        self.manifest.update(extra, skipped=results._skipped(), complete=True)
        write_json(self.root / MANIFEST, self.manifest)
        return open_results(self.root)


class Results:
    """A store opened for reading (``open_results``). Nothing is loaded until asked for.

    ``index``: the pyarrow Table (``.to_pandas()`` where pandas is installed), one row per
    image x method x target with columns path, label, prediction, score, method, rank, target,
    target_score, shard, offset, height, width, seconds (and ``<metric>_auc`` when computed).
    ``maps(method, rows)``: the maps of those index rows as one tensor ``[n, H, W]``.
    ``batches(method, batch_size)``: ``(index slice, maps)`` pairs over the method's rows.
    ``manifest``: the parsed manifest.json.
    """

    def __init__(self, root, check: bool = True):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: not a result store (no {MANIFEST})")
        self.manifest = json.loads(path.read_text())
        if check and not (self.root / INDEX).is_file():
            raise FileNotFoundError(f"{self.root}: the run did not finish (no {INDEX}); re-run the "
                                    "same command to resume it")
        self._index = None

    @property
    def index(self):
        if self._index is None:
            self._index = _need("pyarrow.parquet").read_table(self.root / INDEX)
        return self._index

    @property
    def methods(self) -> list:
        return [entry[0] for entry in self.manifest["config"]["methods"]]

    def __len__(self) -> int:
        return self.index.num_rows

    def _open(self, shard: int):
        return _need("safetensors").safe_open(str(shard_path(self.root, shard)), framework="pt")

    def maps(self, method: str, rows) -> torch.Tensor:
        """Maps ``[len(rows), H, W]`` of the index rows ``rows`` (ints, a slice or a range);
        every row must be of ``method``. Reads only the shards those rows live in."""
        index = self.index
        rows = list(range(index.num_rows)[rows]) if isinstance(rows, slice) else [int(r) for r in rows]
        if any(not 0 <= r < index.num_rows for r in rows):
            raise IndexError(f"rows: expected indices in [0, {index.num_rows}), got {rows}")
        taken = index.take(rows).to_pydict() if rows else {"method": [], "shard": [], "offset": []}
        wrong = sorted({m for m in taken["method"] if m != method})
        if wrong:
            raise ValueError(f"rows: rows of {', '.join(wrong)} asked for as {method!r}")
        out = [None] * len(rows)
        by_shard = {}
        for i, (shard, offset) in enumerate(zip(taken["shard"], taken["offset"])):
            by_shard.setdefault(shard, []).append((i, offset))
        for shard, wanted in by_shard.items():
            with self._open(shard) as f:
                part = f.get_slice(method)
                lo, hi = min(o for _, o in wanted), max(o for _, o in wanted) + 1
                block = part[lo:hi]
                for i, offset in wanted:
                    out[i] = block[offset - lo]
        if not out:
            return torch.empty(0)
        return torch.stack(out)

    def inputs(self, rows) -> torch.Tensor:
        """The input thumbnails (uint8 ``[n, 3, h, w]``) of the index rows ``rows``."""
        taken = self.index.take(list(rows)).to_pydict()
        out = []
        for shard, image in zip(taken["shard"], taken["image_offset"]):
            with self._open(shard) as f:
                out.append(f.get_slice(INPUTS)[image:image + 1][0])
        return torch.stack(out) if out else torch.empty(0, dtype=torch.uint8)

    def batches(self, method: str, batch_size: int = 256):
        """Yield ``(index rows as a pyarrow Table, maps [n, H, W])`` over ``method``'s rows."""
        import pyarrow.compute as pc
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        rows = pc.indices_nonzero(pc.equal(self.index["method"], method)).to_pylist()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield self.index.take(chunk), self.maps(method, chunk)

    def shard_numbers(self) -> list:
        return sorted(int(p.stem) for p in (self.root / SHARDS).glob("*.safetensors"))

    def _shard_meta(self, shard: int) -> dict:
        with self._open(shard) as f:
            meta = f.metadata()
        return json.loads(meta["shard"])

    def _skipped(self) -> list:
        return [entry for s in self.shard_numbers() for entry in self._shard_meta(s)["skipped"]]

    def _build_index(self, methods: list):
        pa = _need("pyarrow")
        columns = {k: [] for k in ("path", "label", "prediction", "score", "method", "rank", "target",
                                   "target_score", "shard", "offset", "image_offset", "height", "width",
                                   "seconds")}
        metric_names = sorted({name for s in self.shard_numbers() for r in self._shard_meta(s)["records"]
                               for per_method in r.get("metrics", {}).values() for name in per_method})
        metric_cols = {m: [] for m in metric_names}
        for shard in self.shard_numbers():
            meta = self._shard_meta(shard)
            timing = json.loads(shard_path(self.root, shard).with_suffix(".json").read_text())["seconds"]
            with self._open(shard) as f:
                shapes = {m: f.get_slice(m).get_shape() for m in methods}
            records = meta["records"]
            for method in methods:
                per_row = timing.get(method, 0.0) / max(1, len(records))
                offset = 0
                for image, rec in enumerate(records):
                    for rank, (target, tscore) in enumerate(zip(rec["targets"], rec["target_scores"])):
                        for key, value in (("path", rec["path"]), ("label", rec["label"]),
                                           ("prediction", rec["prediction"]), ("score", rec["score"]),
                                           ("method", method), ("rank", rank), ("target", target),
                                           ("target_score", tscore), ("shard", shard), ("offset", offset),
                                           ("image_offset", image), ("height", shapes[method][1]),
                                           ("width", shapes[method][2]), ("seconds", per_row)):
                            columns[key].append(value)
                        for m in metric_names:
                            metric_cols[m].append(rec.get("metrics", {}).get(method, {}).get(m, [None])[rank])
                        offset += 1
        types = {"label": pa.int64(), "prediction": pa.int64(), "score": pa.float32(), "rank": pa.int32(),
                 "target": pa.int64(), "target_score": pa.float32(), "shard": pa.int32(), "offset": pa.int32(),
                 "image_offset": pa.int32(), "height": pa.int32(), "width": pa.int32(), "seconds": pa.float64()}
        arrays = {k: pa.array(v, type=types.get(k, pa.string())) for k, v in columns.items()}
        arrays.update({f"{m}_auc": pa.array(v, type=pa.float64()) for m, v in metric_cols.items()})
        return pa.table(arrays)


def open_results(path) -> Results:
    """Open a result store written by ``cnnviz explain`` / ``explain_dataset`` for reading.

    Lazy: the Parquet index is read on first use of ``.index``; maps are read per shard
    (safetensors slices, memory-mapped) by ``.maps(method, rows)`` and ``.batches(...)``.
    """
    return Results(path)
