"""upsample_normalize: every fast backend against the reference, computed in float64."""
import pytest
import torch
import torch.nn.functional as F

from cnnviz_fast import upsample_normalize
from cnnviz_fast.reference import upsample_normalize_ref
from tests.helpers import assert_close, fast_backends

# (B, k, h, w, H, W): why each shape is here
SHAPES = [
    (1, 1, 1, 1, 5, 7),        # 1x1 map: constant after resize -> zeros
    (2, 3, 7, 7, 224, 224),    # Grad-CAM on a ResNet layer4 map
    (1, 5, 13, 11, 97, 61),    # primes, H != W
    (3, 1, 14, 14, 28, 28),    # exact 2x
    (2, 2, 9, 6, 9, 6),        # same size: normalize only
    (1, 2, 20, 30, 11, 7),     # downsampling
]
SEEDED = [(seed, tuple(int(v) for v in torch.randint(1, 24, (6,), generator=torch.Generator().manual_seed(seed))))
          for seed in (11, 12, 13)]
CASES = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s))) for seed, s in SEEDED]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_reference(backend, shape, normalize, mode):
    B, k, h, w, H, W = shape
    maps = torch.randn(B, k, h, w) * 3 + 1
    expected = upsample_normalize_ref(maps.double(), (H, W), mode, normalize)
    got = upsample_normalize(maps, (H, W), mode=mode, normalize=normalize, backend=backend)
    assert got.dtype == torch.float32 and got.device == maps.device
    # Normalization divides by the map's range, so errors scale by max|x| / range.
    assert_close(got, expected, rtol=1e-5, atol=1e-5, what=f"{backend} {shape}")


def test_reference_is_interpolate_then_minmax():
    maps = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    up = F.interpolate(maps, size=(17, 9), mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    expected = ((flat - lo) / (hi - lo)).view_as(up)
    assert_close(upsample_normalize_ref(maps, (17, 9)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_constant_maps_give_zeros_not_nan(backend):
    maps = torch.full((2, 2, 3, 3), 4.5)
    maps[1, 1] = torch.arange(9.0).view(3, 3)
    out = upsample_normalize(maps, 8, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(2, 8, 8)) and torch.equal(out[1, 0], torch.zeros(8, 8))
    assert out[1, 1].min().item() == 0.0 and out[1, 1].max().item() == pytest.approx(1.0)


def test_size_none_keeps_resolution_and_auto_backend_runs():
    maps = torch.rand(2, 1, 6, 5)
    out = upsample_normalize(maps)
    assert out.shape == maps.shape
    assert_close(out, upsample_normalize_ref(maps.double(), None), rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    maps = torch.randn(3, 4, 9, 8).transpose(2, 3)
    assert_close(upsample_normalize(maps, (10, 13), backend="cpp"),
                 upsample_normalize_ref(maps.double(), (10, 13)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(maps=torch.rand(3, 4, 5)), "maps: expected a 4-D"),
    (dict(maps=torch.ones(1, 1, 2, 2, dtype=torch.long)), "maps: expected a floating"),
    (dict(maps=torch.rand(1, 1, 2, 2), mode="bicubic"), "mode: expected one of"),
    (dict(maps=torch.rand(1, 1, 2, 2), size=0), "size: expected values >= 1"),
    (dict(maps=torch.rand(1, 1, 2, 2), size=(2.5, 3)), "size: expected an int or a pair"),
    (dict(maps=torch.rand(1, 1, 2, 2), backend="cuda"), "backend: expected one of"),
    (dict(maps=torch.rand(1, 1, 2, 2, dtype=torch.float64), backend="cpp"), "backend='cpp' takes"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        upsample_normalize(**bad)


def test_auto_choice_falls_back_for_other_dtypes():
    maps = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    assert upsample_normalize(maps, 5).dtype == torch.float64
