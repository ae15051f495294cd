"""Numpy where the peers take numpy: FeatureIndex as FAISS users call it, pca and tsne as
scikit-learn and openTSNE users call them."""
import numpy as np
import pytest
import torch

from cnnviz_fast import FeatureIndex, pca, tsne

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def vectors():
    return np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_feature_index_numpy_in_numpy_out(vectors, metric):
    index = FeatureIndex(16, metric=metric, kind="flat").add(vectors, ids=np.arange(300, 600))
    found = index.search(vectors[:5], k=3)
    assert isinstance(found.distances, np.ndarray) and found.distances.dtype == np.float32
    assert isinstance(found.ids, np.ndarray) and found.ids.dtype == np.int64
    assert found.ids[:, 0].tolist() == list(range(300, 305))   # each query finds itself first
    same = index.search(torch.from_numpy(vectors[:5]), k=3)     # tensor queries: tensors, same answers
    assert isinstance(same.ids, torch.Tensor)
    assert np.array_equal(same.ids.numpy(), found.ids)
    assert np.allclose(same.distances.numpy(), found.distances)


def test_feature_index_numpy_errors(vectors):
    index = FeatureIndex(16)
    with pytest.raises(TypeError, match="vectors: expected a floating-point array"):
        index.add(np.zeros((2, 16), dtype=np.int32))
    with pytest.raises(ValueError, match="vectors: expected vectors of dimension 16"):
        index.add(vectors[:, :8])


def test_pca_and_tsne_take_and_return_numpy(vectors):
    points = pca(vectors)
    assert isinstance(points, np.ndarray) and points.shape == (300, 2)
    assert np.allclose(points, pca(torch.from_numpy(vectors)).numpy(), atol=1e-5)
    pytest.importorskip("openTSNE")
    mapped = tsne(vectors[:60], perplexity=10, n_iter=20, early_exaggeration_iter=10, n_jobs=1)
    assert isinstance(mapped, np.ndarray) and mapped.shape == (60, 2) and mapped.dtype == np.float32
