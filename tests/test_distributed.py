"""cnnviz_fast.distributed on a local Ray cluster the tests start (2 CPUs): top-k patches and
embeddings over a Ray Dataset equal the single-process run; a killed actor's batch is
retried and the result is unchanged. Tiny integer-weight nets keep each run to seconds.
The single-process runs take one thread, as each Ray actor does (Ray sets OMP_NUM_THREADS
to an actor's one CPU): float reductions split over other thread counts round differently."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast import cli
from cnnviz_fast import distributed as dist
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn
from cnnviz_fast.pipeline import ExplainError, explain_dataset
from cnnviz_fast.store import open_results
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)
from tests.test_activations import _integer_net

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    # workers import this worktree's package and this test module (model_fn lives here)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images():
    # integer images on an integer net: exact sums whatever the batching, and many ties
    return torch.randint(0, 3, (40, 3, 16, 16), generator=torch.Generator().manual_seed(4)).float()


@pytest.fixture(scope="module")
def ids():
    return 1000 + torch.randperm(40, generator=torch.Generator().manual_seed(5))


def _dataset(images, ids):
    return ray.data.from_items([{"id": int(i), "image": x.numpy()} for x, i in zip(images, ids)])


class _DiesOnce(nn.Module):
    """The default shapes model, whose process exits at its third forward pass the first time
    any actor's copy gets there (a marker file says it happened): an actor killed mid-run.
    The driver (``driver_pid``) never exits."""

    def __init__(self, marker, driver_pid):
        super().__init__()
        self.net, self.marker, self.driver_pid, self.calls = shapes_cnn(), Path(marker), driver_pid, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3 and os.getpid() != self.driver_pid and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return self.net(x)


def _dies_once(marker, driver_pid):
    return _DiesOnce(marker, driver_pid)


def test_import_never_imports_ray():
    code = "import sys, cnnviz_fast, cnnviz_fast.distributed; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _assert_topk_equal(got, expected):
    assert got.keys() == expected.keys()
    for layer in expected:
        for a, b in zip(got[layer], expected[layer]):
            assert a == b if isinstance(a, tuple) else torch.equal(a, b), layer


def test_top_k_patches_ray_equals_single_process(cluster, images, ids):
    # a dataset still to be computed (a map task), with actors on both CPUs: read first, not stalled
    lazy = _dataset(images, ids).map_batches(lambda batch: batch)
    got = dist.top_k_patches_ray(lazy, _integer_net, ["1", "4"], k=5, batch_size=7,
                                 num_actors=2)
    expected = cf.top_k_patches(_integer_net(), zip(images.split(9), ids.split(9)), ["1", "4"], k=5,
                                progress=False)
    _assert_topk_equal(got, expected)


def test_embed_ray_shards_equal_embed(cluster, images, ids, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "stale.safetensors").write_bytes(b"an earlier run's shard")
    manifest = dist.embed_ray(_dataset(images, ids), _integer_net, "5", out=tmp_path, batch_size=6,
                              num_actors=2)
    got = dist.load_embeddings(tmp_path)
    expected = cf.embed(_integer_net(), images, "5", progress=False).vectors
    order = torch.argsort(ids)
    assert torch.equal(got.ids, ids[order]) and torch.equal(got.vectors, expected[order])
    assert not (tmp_path / "shards" / "stale.safetensors").exists()
    listed = json.loads(manifest.read_text())["shards"]
    assert sorted(listed) == sorted(f"shards/{p.name}" for p in (tmp_path / "shards").iterdir())
    assert len(listed) >= 7  # one shard per batch of at most 6
    index = cf.FeatureIndex.from_shards(tmp_path, kind="flat")
    found = index.search(expected[:5], k=3)
    direct = cf.FeatureIndex(expected.shape[1], kind="flat").add(got.vectors, got.ids).search(expected[:5], k=3)
    assert torch.equal(found.distances, direct.distances)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(shapes(10, seed=6).images):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(root / f"{i:02d}.png")
    return root


EXPLAIN = dict(batch_size=2, shard_size=4, report=False, progress=False)


def _assert_same_store(a, b, paths=None):
    """Same index (timings aside; ``a``'s paths ``paths`` when given), maps and thumbnails."""
    ta, tb = a.index.drop_columns(["seconds"]), b.index.drop_columns(["seconds"])
    if paths is not None:
        assert ta["path"].to_pylist() == paths
        ta, tb = ta.drop_columns(["path"]), tb.drop_columns(["path"])
    assert ta.equals(tb), (ta.to_pydict(), tb.to_pydict())
    assert a.manifest["complete"] and b.manifest["complete"]
    for method in a.methods:
        rows = range(len(a))
        wanted = [r for r in rows if ta["method"][r].as_py() == method]
        ma, mb = a.maps(method, wanted), b.maps(method, wanted)
        bad = (ma != mb).flatten(1).any(1).nonzero().flatten().tolist()
        assert not bad, (method, bad, float((ma - mb).abs().max()), a.index.take(bad).to_pydict()["path"])
    assert torch.equal(a.inputs(range(len(a))), b.inputs(range(len(b))))


def test_cnnviz_explain_ray_writes_the_single_process_store_and_resumes(cluster, folder, tmp_path):
    local = explain_dataset(folder, tmp_path / "local", ["grad_cam", "saliency"], workers=0, **EXPLAIN)
    argv = ["explain", "--data", str(folder), "--method", "grad_cam", "--method", "saliency", "--out",
            str(tmp_path / "ray"), "--batch-size", "2", "--shard-size", "4", "--quiet", "--ray", "auto",
            "--num-actors", "2"]
    assert cli.main(argv) == 0
    _assert_same_store(open_results(tmp_path / "ray"), local)
    # resume: a lost shard is redone, the others are kept as they are
    kept = (tmp_path / "ray" / "shards" / "00000.safetensors").stat().st_mtime_ns
    (tmp_path / "ray" / "shards" / "00001.safetensors").unlink()
    assert cli.main(argv) == 0
    assert (tmp_path / "ray" / "shards" / "00000.safetensors").stat().st_mtime_ns == kept
    _assert_same_store(open_results(tmp_path / "ray"), local)


def test_explain_dataset_ray_with_a_killed_actor(cluster, folder, tmp_path):
    marker = tmp_path / "died"
    model_fn = functools.partial(_dies_once, marker, os.getpid())
    options = dict(size=64, crop=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **EXPLAIN)
    methods = ["grad_cam:layer='net.features'", "integrated_gradients:steps=4"]
    ds = ray.data.read_images(str(folder), include_paths=True)
    got = dist.explain_dataset_ray(ds, model_fn, methods, out=tmp_path / "ray", num_actors=2, **options)
    assert marker.exists(), "no actor was killed"
    assert not list((tmp_path / "ray").rglob("*.tmp"))
    expected = explain_dataset(folder, tmp_path / "local", methods, model=model_fn, workers=0, **options)
    assert len(got) == 2 * 10
    _assert_same_store(got, expected)


def test_explain_dataset_ray_from_the_image_column_alone(cluster, folder, tmp_path):
    ds = ray.data.read_images(str(folder))  # no path column: image i is row i
    assert ds.schema().names == ["image"]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in sorted(folder.iterdir())])
    torch.save({"images": x}, tmp_path / "images.pt")  # uint8, scaled to [0, 1] as the column is
    methods = ["grad_cam:layer='features'", "saliency"]
    got = dist.explain_dataset_ray(ds, shapes_cnn, methods, out=tmp_path / "ray", num_actors=2, **EXPLAIN)
    expected = explain_dataset(tmp_path / "images.pt", tmp_path / "local", methods, model=shapes_cnn, workers=0,
                               **EXPLAIN)
    rows = got.index["path"].to_pylist()
    _assert_same_store(got, expected, paths=rows)
    assert sorted(set(rows)) == [f"ray.data.Dataset#{i}" for i in range(10)]
    assert "ray.data.Dataset of 10 images (sha256 " in got.manifest["config"]["data"]


def test_dataset_items_numbers_rows_in_order(cluster):
    rows = [{"image": np.full((4, 5, 3), i, np.uint8), "label": 7 - i} for i in range(7)]
    items = dist.dataset_items(ray.data.from_items(rows, override_num_blocks=3))
    assert items.keys == list(range(7)) and items.labels == [7 - i for i in range(7)]
    assert items.tensors.shape == (7, 3, 4, 5)
    for i in range(7):
        assert torch.equal(items.tensors[i], torch.full((3, 4, 5), i / 255))
    # the same rows again: the same source (the resume check); other pixels: another
    again = dist.dataset_items(ray.data.from_items(rows, override_num_blocks=2))
    assert again.source == items.source
    rows[3]["image"] = rows[3]["image"] + 1
    assert dist.dataset_items(ray.data.from_items(rows)).source != items.source
    with pytest.raises(ExplainError, match="several shapes"):
        dist.dataset_items(ray.data.from_items([{"image": np.zeros((4, 4, 3), np.uint8)},
                                                {"image": np.zeros((5, 4, 3), np.uint8)}], override_num_blocks=2))
    with pytest.raises(ExplainError, match="needs an 'image' column .* or a 'path'"):
        dist.dataset_items(ray.data.from_items([{"pixels": 1}]))


def test_bad_arguments(cluster, images, ids):
    ds = _dataset(images[:2], ids[:2])
    with pytest.raises(ValueError, match="image_column: the dataset has no column 'pixels'"):
        dist.top_k_patches_ray(ds, _integer_net, "1", image_column="pixels")
    with pytest.raises(ValueError, match="id_column: .*no column 'key' and no 'path'"):
        dist.top_k_patches_ray(ds, _integer_net, "1", id_column="key")
    with pytest.raises(ValueError, match="num_actors: expected an int >= 1"):
        dist.top_k_patches_ray(ds, _integer_net, "1", num_actors=0)
    with pytest.raises(TypeError, match="model_fn: expected a function returning an nn.Module"):
        dist.top_k_patches_ray(ds, lambda: "model", "1")
