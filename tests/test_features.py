"""Feature space: embed, FeatureIndex (against brute-force torch), pca / tsne, pictures."""
import math
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("faiss")

from cnnviz_fast import FeatureIndex, embed, embedding_plot, neighbours_grid, pca, tsne  # noqa: E402
from tests.helpers import assert_close  # noqa: E402


def clustered(n, d, centres=20, spread=3.0, seed=0):
    """Gaussian blobs: (vectors [n, d], cluster labels [n]), plus a generator for more."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * spread
    labels = torch.randint(0, centres, (n,), generator=g)
    return c[labels] + torch.randn(n, d, generator=g), labels


def brute_force(x, q, k):
    """Reference: squared L2 by torch.cdist in float64, then topk."""
    d = torch.cdist(q.double(), x.double()).square()
    return d.topk(k, largest=False)


def recall_at(found, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist())]))


# (N, D, Q, k): a single vector, k = N, prime sizes, a penultimate-layer width
FLAT_CASES = [(1, 8, 2, 1), (97, 3, 5, 97), (500, 24, 37, 7), (211, 512, 13, 10)]


@pytest.mark.parametrize("n,d,q,k", FLAT_CASES + [
    pytest.param(*[int(v) for v in np.random.default_rng(s).integers([2, 1, 1, 1], [400, 64, 40, 2])], id=f"seed{s}")
    for s in (1, 2)])
def test_flat_equals_cdist_topk(n, d, q, k):
    x, queries = torch.randn(n, d), torch.randn(q, d)
    k = min(k, n)
    got = FeatureIndex(d, kind="flat").add(x).search(queries, k)
    ref = brute_force(x, queries, k)
    scale = float(ref.values.abs().max()) + 1
    assert_close(got.distances, ref.values.float(), rtol=1e-5, atol=1e-5 * scale, what="distances")
    # ids: the distances they point at are the reference's, and they are the reference's ids
    # wherever a distance is apart from its sorted neighbours (near-ties may come in either order)
    exact = torch.cdist(queries.double(), x.double()).square().gather(1, got.ids)
    assert_close(exact, ref.values, rtol=1e-5, atol=1e-5 * scale, what="distances at the returned ids")
    pad = torch.full((q, 1), math.inf, dtype=torch.float64)
    gap = ref.values.diff(dim=1).abs()
    isolated = (torch.cat([pad, gap], 1) > 1e-4 * scale) & (torch.cat([gap, pad], 1) > 1e-4 * scale)
    assert isolated.float().mean() > 0.5
    assert torch.equal(got.ids[isolated], ref.indices[isolated])


def test_cosine_matches_brute_force_and_l2_on_normalized():
    x, _ = clustered(400, 16)
    queries = torch.randn(25, 16)
    got = FeatureIndex(16, metric="cosine", kind="flat").add(x).search(queries, 6)
    sims = torch.nn.functional.normalize(queries.double(), dim=1) @ torch.nn.functional.normalize(x.double(), dim=1).T
    ref = sims.topk(6)
    assert torch.equal(got.ids, ref.indices)
    assert_close(got.distances, (1 - ref.values).float(), rtol=1e-5, atol=1e-6, what="1 - cos")
    unit = torch.nn.functional.normalize(x, dim=1)
    l2 = FeatureIndex(16, metric="l2", kind="flat").add(unit).search(torch.nn.functional.normalize(queries, dim=1), 6)
    assert torch.equal(got.ids, l2.ids)
    assert_close(got.distances, l2.distances / 2, rtol=1e-6, atol=1e-7, what="cosine vs l2 / 2")


def test_ids_survive_batches_and_strings(tmp_path):
    x, _ = clustered(300, 8)
    names = [f"img_{i:04d}.png" for i in range(300)]
    index = FeatureIndex(8, kind="flat")
    for start in range(0, 300, 70):          # uneven batches
        index.add(x[start:start + 70], names[start:start + 70])
    got = index.search(x[:5], 3)
    assert [row[0] for row in got.ids] == names[:5]          # each vector's nearest is itself
    loaded = FeatureIndex.load(index.save(tmp_path / "s.fidx"))
    assert loaded.search(x[:5], 3).ids == got.ids
    # int ids: a tensor, then default running positions continue after them
    ints = FeatureIndex(8, kind="flat").add(x[:10], torch.arange(1000, 1010)).add(x[10:20])
    ids = ints.search(x[[0, 15]], 1).ids[:, 0]
    assert ids.tolist() == [1000, 15]
    assert ids.dtype == torch.int64


def test_batched_adds_equal_one_add():
    x, _ = clustered(900, 12)
    queries = x[::37] + 0.1
    one = FeatureIndex(12, kind="ivf", nprobe=4, seed=3).add(x)
    many = FeatureIndex(12, kind="ivf", nprobe=4, seed=3)
    for chunk in x.split(250):
        many.add(chunk)
    a, b = one.search(queries, 5), many.search(queries, 5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.distances, b.distances)


def test_ivf_with_every_list_probed_is_exact():
    x, _ = clustered(800, 10)
    queries = torch.randn(30, 10) * 3
    nlist = round(2 * math.sqrt(800))
    ivf = FeatureIndex(10, kind="ivf", nlist=nlist, nprobe=nlist).add(x).search(queries, 8)
    flat = FeatureIndex(10, kind="flat").add(x).search(queries, 8)
    assert torch.equal(ivf.ids, flat.ids)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw", "auto"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_save_load_round_trip(tmp_path, kind, metric):
    x, _ = clustered(1200, 16)
    index = FeatureIndex(16, metric=metric, kind=kind, flat_max=1000).add(x, torch.arange(1200) * 7)
    queries = torch.randn(40, 16) * 3
    before = index.search(queries, 10)
    path = index.save(tmp_path / "sub" / "index.fidx")
    loaded = FeatureIndex.load(path)
    after = loaded.search(queries, 10)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.distances, after.distances)
    assert (loaded.built_kind, loaded.nprobe, loaded.measured_recall, len(loaded)) == \
        (index.built_kind, index.nprobe, index.measured_recall, 1200)
    assert [p.name for p in path.parent.iterdir()] == ["index.fidx"]   # no temp file left
    loaded.add(torch.randn(3, 16), [5, 6, 8])                          # still usable, ids checked
    with pytest.raises(ValueError, match="duplicate id 14"):
        loaded.add(torch.randn(1, 16), [14])


def test_auto_rule_flat_then_ivf_with_measured_recall():
    x, labels = clustered(3000, 16, centres=30)
    fresh, _ = clustered(300, 16, centres=30)    # same centres (same seed), new points
    fresh = fresh + 0.05 * torch.randn_like(fresh)
    index = FeatureIndex(16, kind="auto", flat_max=2000).add(x[:1500])
    index.search(fresh[:2], 10)
    assert index.built_kind == "flat" and index.nprobe is None
    index.add(x[1500:])                          # crosses flat_max: rebuilt as IVF at the next search
    got = index.search(fresh, 10)
    assert index.built_kind == "ivf"
    assert index.measured_recall >= 0.95
    assert 1 <= index.nprobe <= round(2 * math.sqrt(3000))
    truth = brute_force(x, fresh, 10).indices
    assert recall_at(got.ids, truth) >= 0.93    # the sampled measurement carries over to new queries
    assert len(index) == 3000


def test_hnsw_and_ivfpq_report_measured_recall():
    x, _ = clustered(1500, 16)
    hnsw = FeatureIndex(16, kind="hnsw").add(x).build()
    assert hnsw.measured_recall >= 0.95 and hnsw.nprobe in (16, 32, 64, 128, 256, 512, 1024)
    pq = FeatureIndex(16, kind="ivfpq", pq_m=4).add(x).build()
    assert 0 < pq.measured_recall <= 1   # capped by the 4-byte codes; measured, not promised


BAD_ADDS = [
    (lambda: torch.randn(4, 7), None, ValueError, "dimension 8"),
    (lambda: torch.randn(8), None, ValueError, "2-D"),
    (lambda: torch.ones(3, 8).index_fill_(0, torch.tensor([1]), float("nan")), None, ValueError, "row 1 holds NaN"),
    (lambda: torch.ones(3, 8).index_fill_(0, torch.tensor([2]), float("inf")), None, ValueError, "row 2"),
    (lambda: torch.ones(3, 8, dtype=torch.int64), None, TypeError, "floating"),
    (lambda: torch.randn(3, 8), [1, 2], ValueError, "expected 3 ids"),
    (lambda: torch.randn(3, 8), [1, 1, 2], ValueError, "duplicate id 1"),
    (lambda: torch.randn(3, 8), [1, "a", 2], TypeError, "all ints or all strings"),
    (lambda: torch.randn(3, 8), [-1, 0, 2], ValueError, ">= 0"),
    (lambda: torch.randn(3, 8), torch.rand(3), TypeError, "integer tensor"),
]


@pytest.mark.parametrize("make,ids,error,match", BAD_ADDS)
def test_bad_adds(make, ids, error, match):
    index = FeatureIndex(8, kind="flat")
    with pytest.raises(error, match=match):
        index.add(make(), ids)
    assert len(index) == 0


def test_bad_searches_and_settings():
    index = FeatureIndex(8, kind="flat")
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(1, 8), 1)
    index.add(torch.randn(5, 8), [10, 11, 12, 13, 14])
    with pytest.raises(ValueError, match="only 5 vectors"):
        index.search(torch.randn(2, 8), 6)
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="dimension 8"):
        index.search(torch.randn(2, 9), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.tensor([[float("nan")] * 8]), 1)
    with pytest.raises(TypeError, match="holds int ids, got str ids"):
        index.add(torch.randn(1, 8), ["a"])
    with pytest.raises(ValueError, match="duplicate id 12"):
        index.add(torch.randn(1, 8), [12])
    with pytest.raises(ValueError, match="zero norm"):
        FeatureIndex(8, metric="cosine").add(torch.zeros(2, 8))
    for kwargs, match in (({"dim": 0}, "dim"), ({"dim": 4, "metric": "ip"}, "metric"),
                          ({"dim": 4, "kind": "lsh"}, "kind"), ({"dim": 6, "pq_m": 4}, "pq_m"),
                          ({"dim": 4, "nprobe": 0}, "nprobe"), ({"dim": 4, "flat_max": 0}, "flat_max"),
                          ({"dim": 4, "target_recall": 1.5}, "target_recall")):
        with pytest.raises(ValueError, match=match):
            FeatureIndex(**kwargs)
    with pytest.raises(ValueError, match="at least 256"):
        FeatureIndex(8, kind="ivfpq").add(torch.randn(100, 8)).build()


def _rewrite_header(src, dst, **changes):
    import json
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    header.update(changes)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_corrupt_and_foreign_files(tmp_path):
    path = FeatureIndex(8, kind="flat").add(torch.randn(50, 8)).save(tmp_path / "good.fidx")
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    cases = {"truncated": raw[: len(raw) // 2], "random": bytes(range(256)) * 4, "flipped": bytes(flipped)}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.fidx"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="corrupt"):
            FeatureIndex.load(bad)
    _rewrite_header(path, tmp_path / "v99.fidx", version=99)
    with pytest.raises(ValueError, match="format version 99; this cnnviz-fast reads version 1"):
        FeatureIndex.load(tmp_path / "v99.fidx")
    _rewrite_header(path, tmp_path / "other.fidx", format="something-else")
    with pytest.raises(ValueError, match="not a cnnviz-fast FeatureIndex"):
        FeatureIndex.load(tmp_path / "other.fidx")
    with pytest.raises(FileNotFoundError):
        FeatureIndex.load(tmp_path / "missing.fidx")
    np.save(tmp_path / "bare.npy", np.zeros(3))                  # an .npy array, not an archive
    with pytest.raises(ValueError, match="not a cnnviz-fast FeatureIndex file, or it is corrupt"):
        FeatureIndex.load(tmp_path / "bare.npy")
    _rewrite_header(path, tmp_path / "nosettings.fidx", settings=None)
    with pytest.raises(ValueError, match="corrupt"):
        FeatureIndex.load(tmp_path / "nosettings.fidx")
    _rewrite_header(path, tmp_path / "baddim.fidx", dim=9)        # header and faiss index disagree
    with pytest.raises(ValueError, match="corrupt"):
        FeatureIndex.load(tmp_path / "baddim.fidx")
    assert zipfile.is_zipfile(path) and path.read_bytes() == raw


def test_failed_save_overwrites_nothing(tmp_path, monkeypatch):
    path = FeatureIndex(8, kind="flat").add(torch.randn(20, 8)).save(tmp_path / "keep.fidx")
    raw = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        FeatureIndex(8, kind="flat").add(torch.randn(30, 8)).save(path)
    assert path.read_bytes() == raw
    assert [p.name for p in tmp_path.iterdir()] == ["keep.fidx"]


# ----------------------------------------------------------------------------- embed

def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.Conv2d(5, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("pool", ["avg", "max", "none"])
def test_embed_pools_layer_output(pool):
    model = tiny_net().train()
    images = torch.rand(7, 3, 9, 11)
    stats = model[1].running_mean.clone()
    got = embed(model, images, "3", pool=pool, batch_size=3, progress=False)
    model.eval()
    acts = model[:4](images)
    model.train()
    want = {"avg": acts.mean((2, 3)), "max": acts.amax((2, 3)), "none": acts.flatten(1)}[pool]
    assert_close(got.vectors, want, rtol=1e-5, atol=1e-6, what=f"embed pool={pool}")
    assert got.vectors.dtype == torch.float32 and torch.equal(got.ids, torch.arange(7))
    # the model is left as found: train mode, BN statistics untouched, no hooks
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)
    assert not any(m._forward_hooks for m in model.modules())


def test_embed_streams_batches_with_ids():
    model = tiny_net().eval()
    images = torch.rand(10, 3, 8, 8)
    batches = [(images[i:i + 4], torch.zeros(len(images[i:i + 4])), [f"p{j}" for j in range(i, min(i + 4, 10))])
               for i in range(0, 10, 4)]
    got = embed(model, batches, "5", progress=False)            # Flatten output [B, 4]: taken as is
    assert got.ids == [f"p{j}" for j in range(10)]
    assert_close(got.vectors, model[:6](images), rtol=1e-5, atol=1e-6, what="embed of 2-D layer")

    class Folder:
        def batches(self, bs):
            for i in range(0, 10, bs):
                yield images[i:i + bs], torch.zeros(len(images[i:i + bs])), torch.arange(i, min(i + bs, 10)) + 100
    assert torch.equal(embed(model, Folder(), "3", batch_size=4, progress=False).ids, torch.arange(100, 110))


def test_embed_image_folder_into_index(tmp_path):
    """A folder on disk streams through embed; its ids come back from the index search."""
    from PIL import Image
    from cnnviz_fast.data import image_folder
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    folder = image_folder(tmp_path, 8)
    model = tiny_net().eval()
    got = embed(model, folder, "3", batch_size=4, progress=False)
    assert torch.equal(got.ids, torch.arange(6)) and got.vectors.shape == (6, 4)
    images = torch.stack([folder[i][0] for i in range(6)])
    assert_close(got.vectors, model[:4](images).mean((2, 3)), rtol=1e-5, atol=1e-6, what="embed of a folder")
    found = FeatureIndex(4, kind="flat").add(got.vectors, got.ids + 50).search(got.vectors, 1)
    assert found.ids[:, 0].tolist() == list(range(50, 56))


def test_embed_bad_input():
    model = tiny_net()
    with pytest.raises(ValueError, match="pool"):
        embed(model, torch.rand(2, 3, 8, 8), "3", pool="sum")
    with pytest.raises(ValueError, match="no module named"):
        embed(model, torch.rand(2, 3, 8, 8), "conv9")
    with pytest.raises(ValueError, match="batch_size"):
        embed(model, torch.rand(2, 3, 8, 8), "3", batch_size=0)
    with pytest.raises(TypeError, match="data"):
        embed(model, [np.zeros((2, 3, 8, 8))], "3", progress=False)
    with pytest.raises(ValueError, match="no images"):
        embed(model, [], "3", progress=False)


def test_neighbours_share_class_on_default_model():
    from cnnviz_fast.data import shapes
    from cnnviz_fast.models import shapes_cnn
    data = shapes(600, seed=1)                  # held out from the model's training (seed 0)
    model = shapes_cnn()
    emb = embed(model, data.images, "avgpool", batch_size=200, progress=False)
    index = FeatureIndex(emb.vectors.shape[1], metric="cosine").add(emb.vectors[:500])
    got = index.search(emb.vectors[500:], 5)
    precision = (data.labels[got.ids] == data.labels[500:, None]).float().mean().item()
    assert precision >= 0.9, f"precision@5 {precision:.3f}"


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_matches_captum_similarity_influence(tmp_path, metric):
    """Captum's brute-force SimilarityInfluence (the peer) finds the same neighbours."""
    pytest.importorskip("captum")
    from captum.influence import SimilarityInfluence
    from captum.influence._core import similarity_influence as captum_sim
    from cnnviz_fast.data import shapes
    from cnnviz_fast.models import shapes_cnn
    data = shapes(120, seed=1)
    model = shapes_cnn().eval()
    similarity, direction = ((captum_sim.cosine_similarity, "max") if metric == "cosine"
                             else (captum_sim.euclidean_distance, "min"))
    # two layers: captum 0.9 double-wraps a single layer's activations and fails
    peer = SimilarityInfluence(model, ["avgpool", "fc"], data.images[:100], str(tmp_path), batch_size=50,
                               similarity_metric=similarity, similarity_direction=direction)
    want_ids, want = peer.influence(data.images[100:], top_k=5)["avgpool"]
    emb = embed(model, data.images, "avgpool", progress=False)
    got = FeatureIndex(emb.vectors.shape[1], metric=metric).add(emb.vectors[:100]).search(emb.vectors[100:], 5)
    assert torch.equal(got.ids, want_ids)
    mine = 1 - got.distances if metric == "cosine" else got.distances.sqrt()
    assert_close(mine, want, rtol=1e-4, atol=1e-5, what=f"{metric} vs captum SimilarityInfluence")


# ----------------------------------------------------------------------------- 2-D maps

def test_pca_matches_sklearn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x, _ = clustered(300, 12, centres=4)
    x = x * torch.linspace(3, 0.5, 12)           # a clear spectrum
    want = torch.from_numpy(decomposition.PCA(3, svd_solver="full").fit_transform(x.double().numpy()))
    exact = pca(x.double(), 3, method="exact")
    assert exact.dtype == torch.float64 and exact.shape == (300, 3)
    assert_close(exact, want, rtol=1e-9, atol=1e-9, what="pca exact vs sklearn")
    assert_close(pca(x, 2, method="randomized"), want[:, :2].float(), rtol=1e-3, atol=1e-3, what="randomized")
    with pytest.raises(ValueError, match="n: expected"):
        pca(x, 13)
    with pytest.raises(ValueError, match="method"):
        pca(x, 2, method="arpack")


def test_tsne_separates_clusters():
    x, labels = clustered(240, 10, centres=3, spread=6.0)
    y = tsne(x, perplexity=20, n_iter=100, early_exaggeration_iter=50, n_jobs=1)
    assert y.shape == (240, 2) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    d = torch.cdist(y, y).fill_diagonal_(math.inf)
    nearest = d.topk(5, largest=False).indices
    assert (labels[nearest] == labels[:, None]).float().mean() > 0.95
    with pytest.raises(ValueError, match="at least 4"):
        tsne(x[:3])
    with pytest.raises(ValueError, match="perplexity"):
        tsne(x, perplexity=0)


# ----------------------------------------------------------------------------- pictures

def test_embedding_plot_scatter_and_thumbnails():
    points = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 2, 3, 0])
    fig = embedding_plot(points, labels=labels, class_names=["a", "b", "c", "d"])
    ax = fig.axes[0]
    assert len(ax.collections) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c", "d"]
    # thumbnails: solid colours; the 5th point shares the top-left cell and is nearer its centre
    colours = torch.eye(3)[[0, 1, 2, 0, 1]]
    images = colours[:, :, None, None].expand(5, 3, 16, 16)
    fig = embedding_plot(points, images=images, grid=2, thumb=8)
    canvas = torch.from_numpy(np.asarray(fig.axes[0].images[0].get_array())).permute(2, 0, 1)
    assert canvas.shape == (3, 16, 16)
    for (r, c), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], colours[[4, 1, 2, 3]]):   # map y up = row 0
        assert torch.allclose(canvas[:, r * 8 + 4, c * 8 + 4], colour)
    framed = embedding_plot(points, images=images, labels=labels, grid=2, thumb=12)
    assert len(framed.axes[0].images) == 1
    with pytest.raises(ValueError, match="points"):
        embedding_plot(torch.rand(4, 3))
    with pytest.raises(ValueError, match="labels"):
        embedding_plot(points, labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="images"):
        embedding_plot(points, images=torch.rand(4, 3, 8, 8))


def test_neighbours_grid_layout():
    queries = torch.rand(2, 3, 5, 5)
    neighbours = torch.rand(2, 3, 3, 5, 5)
    grid = neighbours_grid(queries, neighbours, padding=1, separator=4)
    assert grid.shape == (3, 13, 30)
    assert torch.equal(grid[:, 7:12, 1:6], queries[1])
    assert torch.equal(grid[:, 7:12, 12 + 6:17 + 6], neighbours[1, 1])
    with pytest.raises(ValueError, match="neighbour_images"):
        neighbours_grid(queries, torch.rand(3, 3, 3, 5, 5))
