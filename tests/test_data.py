"""Embedded data: generated shapes, bundled photos, image folders."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cnnviz_fast.data import SHAPE_CLASSES, ImageReadError, image_folder, sample_photos, shapes


def test_shapes_contents():
    data = shapes(60, size=48, seed=3)
    assert data.images.shape == (60, 3, 48, 48) and data.images.dtype == torch.float32
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert data.masks.shape == (60, 48, 48) and data.masks.dtype == torch.bool
    assert data.class_names == SHAPE_CLASSES and len(SHAPE_CLASSES) >= 6
    assert torch.bincount(data.labels, minlength=6).tolist() == [10] * 6
    for mask, (x0, y0, x1, y1) in zip(data.masks, data.boxes.tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 20
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
    # The shape differs from the background: mean colour inside vs outside the mask.
    inside = (data.images * data.masks[:, None]).sum((2, 3)) / data.masks.sum((1, 2))[:, None]
    outside = (data.images * ~data.masks[:, None]).sum((2, 3)) / (~data.masks).sum((1, 2))[:, None]
    assert ((inside - outside).norm(dim=1) > 0.2).float().mean() > 0.9


def test_shapes_deterministic_and_seeded():
    a, b, c = shapes(12, seed=5), shapes(12, seed=5), shapes(12, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_shapes_class_subset():
    data = shapes(8, seed=0, classes=("ring", "star"))
    assert data.class_names == ("ring", "star") and set(data.labels.tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be >= 1"),
    ({"n": 2.5}, "n must be an int"),
    ({"n": 4, "size": 8}, "size must be >= 16"),
    ({"n": 4, "classes": ("hexagon",)}, "classes must be distinct names"),
    ({"n": 4, "classes": "ring"}, "not a str"),
])
def test_shapes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shapes(**kwargs)


def test_sample_photos():
    photos = sample_photos(size=32)
    assert photos.images.ndim == 4 and photos.images.shape[1:] == (3, 32, 32)
    assert len(photos.names) == len(photos.images) >= 3
    assert 0 <= photos.images.min() and photos.images.max() <= 1
    full = sample_photos()
    assert isinstance(full.images, list) and full.images[0].shape[0] == 3


def _write(path, colour):
    Image.fromarray(np.full((10, 14, 3), colour, dtype=np.uint8)).save(path)


def test_image_folder_with_classes(tmp_path):
    for cls, colour in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _write(tmp_path / cls / f"{i}.png", colour)
    data = image_folder(tmp_path, size=(8, 6))
    assert len(data) == 6 and data.classes == ("cat", "dog")
    image, label, index = data[4]
    assert image.shape == (3, 8, 6) and label == 1 and index == 4
    assert abs(float(image.mean()) - 200 / 255) < 1e-6
    batches = list(data.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(6))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor([0, 0, 0, 1, 1, 1]))


def test_image_folder_bad_file(tmp_path):
    _write(tmp_path / "good.png", 50)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        image_folder(tmp_path, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = image_folder(tmp_path, 8, skip_bad=True)
    assert len(data) == 1 and data.labels.tolist() == [-1]
    assert any("broken.jpg" in str(w.message) for w in caught)


def test_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope", 8)
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder(tmp_path, 8)
