"""FeatureIndex.from_shards (no Ray): an index built shard by shard answers as the index
built from all vectors in memory, for exact and IVF search (same trained lists, same nprobe)."""
import pytest
import torch

import cnnviz_fast as cf
from cnnviz_fast.explain.features import write_embedding_shard

pytest.importorskip("faiss")
pytest.importorskip("safetensors")


def _shards(tmp_path, vectors, ids, sizes):
    paths = []
    for n, (v, i) in enumerate(zip(vectors.split(sizes), ids.split(sizes) if isinstance(ids, torch.Tensor)
                                   else [ids[a:a + s] for a, s in zip(_starts(sizes), sizes)])):
        paths.append(tmp_path / f"{n}.safetensors")
        write_embedding_shard(paths[-1], v, i)
    return paths


def _starts(sizes):
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


@pytest.mark.parametrize("kind,metric", [("flat", "l2"), ("ivf", "l2"), ("ivf", "cosine")])
def test_from_shards_answers_as_the_in_memory_index(tmp_path, kind, metric):
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(700, 12, generator=g) + 3 * torch.randn(10, 12, generator=g).repeat(70, 1)
    ids = torch.randperm(700, generator=g) + 5
    paths = _shards(tmp_path, vectors, ids, [250, 1, 300, 149])
    index = cf.FeatureIndex.from_shards(paths, metric=metric, kind=kind)
    direct = cf.FeatureIndex(12, metric=metric, kind=kind).add(vectors, ids)
    queries = torch.randn(20, 12, generator=g)
    a, b = index.search(queries, k=7), direct.search(queries, k=7)
    assert torch.equal(a.ids, b.ids) and torch.allclose(a.distances, b.distances)
    assert index.built_kind == direct.built_kind == kind
    assert index.nprobe == direct.nprobe and index.measured_recall == direct.measured_recall
    again = cf.FeatureIndex.load(index.save(tmp_path / "index.fidx"))
    assert torch.equal(again.search(queries, k=7).ids, a.ids)


def test_from_shards_string_ids_and_bad_input(tmp_path):
    vectors = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    names = [f"img{i}.png" for i in range(30)]
    paths = _shards(tmp_path, vectors, names, [10, 20])
    found = cf.FeatureIndex.from_shards(paths).search(vectors[12:13], k=1)
    assert found.ids == [["img12.png"]]
    with pytest.raises(FileNotFoundError, match="no embeddings.json"):
        cf.FeatureIndex.from_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing shard files"):
        cf.FeatureIndex.from_shards([tmp_path / "nope.safetensors"])
    write_embedding_shard(tmp_path / "wide.safetensors", torch.zeros(2, 5), torch.tensor([100, 101]))
    with pytest.raises(ValueError, match="dimensions \\[4, 5\\]"):
        cf.FeatureIndex.from_shards([*paths, tmp_path / "wide.safetensors"])
    write_embedding_shard(tmp_path / "dup.safetensors", torch.zeros(1, 4), ["img3.png"])
    with pytest.raises(ValueError, match="duplicate id 'img3.png'"):
        cf.FeatureIndex.from_shards([*paths, tmp_path / "dup.safetensors"])


def test_from_shards_hnsw_reaches_the_target_recall(tmp_path):
    # an HNSW graph depends on how inserts are batched, so it matches the in-memory one only
    # up to its recall
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(600, 8, generator=g)
    index = cf.FeatureIndex.from_shards(_shards(tmp_path, vectors, torch.arange(600), [200, 400]), kind="hnsw")
    exact = cf.FeatureIndex(8, kind="flat").add(vectors).search(vectors[:50], k=10).ids
    found = index.search(vectors[:50], k=10).ids
    recall = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()
    assert index.measured_recall >= 0.95 and recall >= 0.9
