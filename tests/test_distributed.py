"""cnnviz_fast.distributed on a local Ray cluster the tests start (2 CPUs): top-k patches and
embeddings over a Ray Dataset equal the single-process run; a killed actor's batch is
retried and the result is unchanged. Tiny integer-weight nets keep each run to seconds."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast import distributed as dist
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
    """The integer net, whose process exits at its second batch the first time any copy of
    it gets there (a marker file says it happened): an actor killed mid-run."""

    def __init__(self, marker):
        super().__init__()
        self.net, self.marker, self.calls = _integer_net(), Path(marker), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return self.net(x)


def _dies_once(marker):
    return _DiesOnce(marker).eval()


def test_import_never_imports_ray():
    code = "import sys, cnnviz_fast, cnnviz_fast.distributed; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _assert_topk_equal(got, expected):
    assert got.keys() == expected.keys()
    for layer in expected:
        for a, b in zip(got[layer], expected[layer]):
            assert a == b if isinstance(a, tuple) else torch.equal(a, b), layer


def test_top_k_patches_ray_equals_single_process(cluster, images, ids):
    got = dist.top_k_patches_ray(_dataset(images, ids), _integer_net, ["1", "4"], k=5, batch_size=7,
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


def test_killed_actor_is_retried_and_the_result_is_unchanged(cluster, images, ids, tmp_path):
    marker = tmp_path / "died"
    got = dist.top_k_patches_ray(_dataset(images, ids), functools.partial(_dies_once, marker),
                                 ["net.1", "net.4"], k=5, batch_size=5, num_actors=2)
    assert marker.exists(), "no actor was killed"
    expected = cf.top_k_patches(_integer_net(), zip(images.split(9), ids.split(9)), ["1", "4"], k=5,
                                progress=False)
    _assert_topk_equal({f"net.{k}": v for k, v in expected.items()}, got)


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
