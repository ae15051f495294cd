"""Data sources for explanation experiments: synthetic shapes, bundled photos, image folders.

Nothing here downloads anything: shapes are generated, photos come from the files that
ship inside scikit-image, and folders are read from local disk.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "SHAPE_CLASSES",
    "ShapesData",
    "shapes",
    "PhotoData",
    "sample_photos",
    "ImageFolder",
    "ImageReadError",
    "image_folder",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star", "ring")

# Shape diameter as a fraction of the image side.
_SCALE_RANGE = (0.25, 0.55)
# Minimum RGB distance between shape colour and background base colour.
_MIN_CONTRAST = 0.45
# Images generated per vectorised chunk; bounds peak memory to a few hundred MB at 64 px.
_CHUNK = 512


class ShapesData(NamedTuple):
    """Synthetic shapes dataset.

    images: float32 [n, 3, size, size] in [0, 1].
    labels: int64 [n], indices into ``class_names``.
    masks: bool [n, size, size], exactly the shape's pixels.
    boxes: int64 [n, 4] as (x0, y0, x1, y1), inclusive pixel bounds of ``masks``.
    class_names: tuple of str.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    class_names: tuple


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, inradius: float) -> np.ndarray:
    """Inside test for a regular polygon centred at 0 with a vertex pointing up (v > 0)."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        # Edge normals sit halfway between vertices.
        angle = -np.pi / 2 + 2 * np.pi * k / sides
        inside &= u * np.cos(angle) + v * np.sin(angle) <= inradius
    return inside


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Inside test for a star polygon with outer radius 1 and inner radius ``inner``."""
    sector = np.pi / points
    rho = np.hypot(u, v)
    # Fold the angle into [0, sector]: 0 = towards an inner vertex, sector = towards a tip.
    alpha = np.abs(np.mod(np.arctan2(v, u) + np.pi / 2, 2 * sector) - sector)
    alpha = sector - alpha
    a = np.array([inner, 0.0])
    b = np.array([np.cos(sector), np.sin(sector)])
    normal = np.array([b[1] - a[1], a[0] - b[0]])  # points away from the origin
    px, py = rho * np.cos(alpha), rho * np.sin(alpha)
    return (px - a[0]) * normal[0] + (py - a[1]) * normal[1] <= 0


def _shape_masks(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Masks for coordinates (u, v) normalised so the shape's outer radius is 1."""
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return _regular_polygon(u, v, 4, 0.72)
    if name == "triangle":
        return _regular_polygon(u, v, 3, 0.5)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "star":
        return _star(u, v)
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    raise AssertionError(name)


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shape and background base colours [n, 3] at least ``_MIN_CONTRAST`` apart."""
    shape_rgb = rng.uniform(0, 1, (n, 3))
    background_rgb = rng.uniform(0, 1, (n, 3))
    # Rejection sampling keeps colour independent of class; a few rounds almost always suffice.
    for _ in range(64):
        close = np.linalg.norm(shape_rgb - background_rgb, axis=1) < _MIN_CONTRAST
        if not close.any():
            break
        background_rgb[close] = rng.uniform(0, 1, (int(close.sum()), 3))
    # Leftovers get the per-channel opposite extreme, which is at least sqrt(3)/2 away.
    close = np.linalg.norm(shape_rgb - background_rgb, axis=1) < _MIN_CONTRAST
    background_rgb[close] = np.where(shape_rgb[close] > 0.5, 0.0, 1.0)
    return shape_rgb, background_rgb


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def shapes(n: int, size: int = 64, seed: int = 0, classes: Sequence[str] | None = None) -> ShapesData:
    """Generate ``n`` images, each with one filled shape on a textured background.

    Every image holds one shape of a random class (balanced: counts differ by at most
    one), random centre, diameter 25-55% of ``size``, rotation and colour, over a smooth
    colour gradient with pixel noise and faint stripes, so a classifier cannot rely on a
    flat background. Deterministic for given (n, size, seed, classes) and independent of
    torch's and numpy's global RNGs (uses ``numpy.random.default_rng(seed)``).

    classes: subset of ``SHAPE_CLASSES`` (order defines the labels); default all. The draws
    do not depend on the names: the same (n, size, seed) with the names reordered gives the
    same labels, geometry, colours and noise, only the drawn shapes change (used to render a
    confusable counterpart at the same place, ``models.train_scouter.confusable_pairs``).
    Returns ``ShapesData`` (see its docstring for shapes and dtypes).
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 16)
    seed = _check_int("seed", seed, 0)
    if classes is None:
        class_names = SHAPE_CLASSES
    else:
        if isinstance(classes, str):
            raise ValueError("classes must be a sequence of class names, not a str")
        class_names = tuple(classes)
        unknown = [c for c in class_names if c not in SHAPE_CLASSES]
        if unknown or not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes!r}")

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(class_names))
    radius = rng.uniform(*_SCALE_RANGE, n) * size / 2
    # Keep the whole shape inside the image.
    centre = rng.uniform(radius[:, None], size - 1 - radius[:, None], (n, 2))
    rotation = rng.uniform(0, 2 * np.pi, n)
    shape_rgb, background_rgb = _contrasting_colours(rng, n)
    gradient_dir = rng.uniform(0, 2 * np.pi, n)
    gradient_rgb = rng.uniform(-0.2, 0.2, (n, 3))
    stripe_dir = rng.uniform(0, 2 * np.pi, n)
    stripe_freq = rng.uniform(0.3, 1.2, n)
    stripe_phase = rng.uniform(0, 2 * np.pi, n)
    stripe_amp = rng.uniform(0.0, 0.08, n)
    noise_std = rng.uniform(0.02, 0.08, n)

    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    coords = np.arange(size, dtype=np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = sl.stop - sl.start
        y = coords[None, :, None]
        x = coords[None, None, :]
        dx = x - centre[sl, 0, None, None].astype(np.float32)
        dy = y - centre[sl, 1, None, None].astype(np.float32)
        cos = np.cos(rotation[sl])[:, None, None].astype(np.float32)
        sin = np.sin(rotation[sl])[:, None, None].astype(np.float32)
        r = radius[sl, None, None].astype(np.float32)
        # Image rows grow downwards, so negate dy to make "up" positive v.
        u = (cos * dx - sin * -dy) / r
        v = (sin * dx + cos * -dy) / r
        chunk_masks = np.zeros((m, size, size), dtype=bool)
        for label, name in enumerate(class_names):
            sel = labels[sl] == label
            if sel.any():
                chunk_masks[sel] = _shape_masks(name, u[sel], v[sel])
        masks[sl] = chunk_masks

        # Background: base colour + linear gradient + stripes, then noise on everything.
        t = (np.cos(gradient_dir[sl])[:, None, None] * x + np.sin(gradient_dir[sl])[:, None, None] * y) / size
        stripes = stripe_amp[sl, None, None] * np.sin(
            stripe_freq[sl, None, None]
            * (np.cos(stripe_dir[sl])[:, None, None] * x + np.sin(stripe_dir[sl])[:, None, None] * y)
            + stripe_phase[sl, None, None]
        )
        background = (
            background_rgb[sl, :, None, None]
            + gradient_rgb[sl, :, None, None] * (t - 0.5)[:, None]
            + stripes[:, None]
        )
        chunk = np.where(chunk_masks[:, None], shape_rgb[sl, :, None, None], background)
        chunk = chunk + rng.normal(0, 1, chunk.shape) * noise_std[sl, None, None, None]
        images[sl] = np.clip(chunk, 0, 1)

    ys = masks.any(axis=2)
    xs = masks.any(axis=1)
    boxes = np.stack(
        [xs.argmax(1), ys.argmax(1), size - 1 - xs[:, ::-1].argmax(1), size - 1 - ys[:, ::-1].argmax(1)],
        axis=1,
    )
    return ShapesData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks),
        boxes=torch.from_numpy(boxes.astype(np.int64)),
        class_names=class_names,
    )


class PhotoData(NamedTuple):
    """Bundled photos: ``images`` float32 [N, 3, S, S] in [0, 1] when resized, else a list
    of float32 [3, H_i, W_i]; ``names`` tuple of str."""

    images: torch.Tensor | list
    names: tuple


# Colour photos that ship inside the scikit-image wheel (no pooch download needed).
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
}


def _to_tensor(image: Image.Image, size: tuple[int, int] | None) -> torch.Tensor:
    """PIL image -> float32 [3, h, w] in [0, 1]; ``size`` is (h, w), bilinear resize."""
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def sample_photos(size: int | None = None) -> PhotoData:
    """Colour photos bundled with scikit-image (astronaut, chelsea, coffee, ...).

    Files are read straight from the installed ``skimage/data`` directory, so this never
    downloads; photos missing from that install are skipped. With ``size`` the photos are
    resized (Pillow bilinear, aspect not kept) and stacked to float32 [N, 3, size, size].
    """
    if size is not None:
        size = _check_int("size", size, 1)
    import skimage.data  # deferred: only this function needs scikit-image

    data_dir = Path(skimage.data.__file__).parent
    images, names = [], []
    for name, filename in _SKIMAGE_PHOTOS.items():
        path = data_dir / filename
        if not path.is_file():
            continue
        with Image.open(path) as image:
            images.append(_to_tensor(image, None if size is None else (size, size)))
        names.append(name)
    if not images:
        raise RuntimeError(f"no bundled scikit-image photos found in {data_dir}")
    return PhotoData(torch.stack(images) if size is not None else images, tuple(names))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class ImageReadError(ValueError):
    """An image file could not be decoded; ``path`` names it."""

    def __init__(self, path: Path, cause: Exception):
        super().__init__(f"cannot read image {path}: {cause}")
        self.path = path


class ImageFolder(torch.utils.data.Dataset):
    """Images of a local folder, decoded and resized once at construction.

    Layout: either image files directly in ``root`` (labels -1, ``classes`` empty) or one
    subfolder per class (labels index the sorted subfolder names; files in ``root``
    itself are then ignored). Images are held as uint8 [N, 3, h, w]; items are
    ``(image float32 [3, h, w] in [0, 1], label int, index int)``.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], skip_bad: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        if isinstance(size, (tuple, list)):
            if len(size) != 2:
                raise ValueError(f"size must be an int or (h, w), got {size!r}")
            self.size = (_check_int("size[0]", size[0], 1), _check_int("size[1]", size[1], 1))
        else:
            side = _check_int("size", size, 1)
            self.size = (side, side)

        subfolders = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = tuple(p.name for p in subfolders)
        sources = [(folder, label) for label, folder in enumerate(subfolders)] or [(root, -1)]
        candidates = [
            (path, label)
            for folder, label in sources
            for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not candidates:
            raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found in {root}")

        pixels, paths, labels = [], [], []
        for path, label in candidates:
            try:
                with Image.open(path) as image:
                    pixels.append((_to_tensor(image, self.size) * 255).round().to(torch.uint8))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                error = ImageReadError(path, err)
                if not skip_bad:
                    raise error from err
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                continue
            paths.append(path)
            labels.append(label)
        if not pixels:
            raise FileNotFoundError(f"no readable images in {root}")
        self.paths = tuple(paths)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._pixels = torch.stack(pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self._pixels[index].float() / 255.0, int(self.labels[index]), index

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (images float32 [b, 3, h, w], labels int64 [b], ids int64 [b]) in order."""
        batch_size = _check_int("batch_size", batch_size, 1)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield (
                self._pixels[start:stop].float() / 255.0,
                self.labels[start:stop],
                torch.arange(start, stop, dtype=torch.int64),
            )


def image_folder(path: str | Path, size: int | tuple[int, int], skip_bad: bool = False) -> ImageFolder:
    """Load a folder of images (png/jpg/jpeg/bmp/webp) as an ``ImageFolder`` dataset.

    Unreadable files raise ``ImageReadError`` (a ValueError naming the file), or with
    ``skip_bad=True`` are skipped with a ``warnings.warn`` naming the file.
    """
    return ImageFolder(path, size, skip_bad=skip_bad)
