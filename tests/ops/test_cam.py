"""cam_combine: every fast backend against the reference, computed in float64."""
import pytest
import torch

from cnnviz_fast import cam_combine
from cnnviz_fast.reference import cam_combine_ref
from tests.helpers import assert_close, fast_backends

# (B, K, h, w, k, size): why each shape is here (k=None: weights without a k axis)
SHAPES = [
    (1, 1, 1, 1, None, (5, 7)),       # K=1 and a 1x1 map: constant after resize -> zeros
    (2, 3, 7, 7, None, (56, 56)),     # layer4-like 7x7 map, 8x upsample
    (1, 5, 13, 11, 3, (97, 61)),      # primes, H != W, three classes per sample
    (3, 1, 14, 14, 2, (28, 28)),      # K=1 with k=2 targets, exact 2x
    (2, 6, 9, 6, None, None),         # size=None keeps the layer's resolution
    (1, 64, 56, 56, None, None),      # ResNet layer1 output
    (8, 512, 7, 7, None, (224, 224)),  # ResNet-18 layer4 output -> 224
    (2, 37, 4, 1, 1, (9, 3)),         # non-power-of-2 K, a 4x1 map
]
SEEDED = []
for seed in (21, 22, 23):
    g = torch.Generator().manual_seed(seed)
    B, K, h, w, k, H, W = (int(v) for v in torch.randint(1, 20, (7,), generator=g))
    SEEDED.append((seed, (B % 4 + 1, K, h, w, k % 4 + 1, (H, W))))
CASES = [pytest.param(s, id="x".join(map(str, s[:5])) + f"-{s[5]}") for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s[:5]))) for seed, s in SEEDED]


def _inputs(shape, elementwise):
    B, K, h, w, k, size = shape
    acts = torch.randn(B, K, h, w) * 2 + 0.5
    lead = (B, K) if k is None else (B, k, K)
    weights = torch.randn(*lead, *((h, w) if elementwise else ()))
    return acts, weights, size


@pytest.mark.parametrize("relu, normalize", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("elementwise", [False, True], ids=["channel", "elementwise"])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_reference(backend, shape, elementwise, relu, normalize):
    acts, weights, size = _inputs(shape, elementwise)
    K = acts.shape[1]
    expected = cam_combine_ref(acts.double(), weights.double(), size or acts.shape[-2:], relu, normalize)
    got = cam_combine(acts, weights, size, relu=relu, normalize=normalize, backend=backend)
    assert got.dtype == torch.float32 and got.device == acts.device
    # float32 sums of K products; normalization divides by the map's range.
    tol = 2e-6 * K ** 0.5 * (1 if normalize else acts.abs().max().item())
    assert_close(got, expected, rtol=1e-5, atol=tol, what=f"{backend} {shape}")


def test_reference_is_weighted_sum_relu_interpolate_minmax():
    acts = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    weights = torch.randn(2, 4, dtype=torch.float64)
    summed = torch.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    up = torch.nn.functional.interpolate(summed, size=(11, 7), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    assert_close(cam_combine_ref(acts, weights, (11, 7)), ((up - lo) / (hi - lo))[:, 0], rtol=1e-12, atol=1e-12)
    # elementwise weights equal to broadcast channel weights give the same maps
    wide = weights[:, :, None, None].expand_as(acts)
    assert_close(cam_combine_ref(acts, wide, (11, 7)), cam_combine_ref(acts, weights, (11, 7)),
                 rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_all_negative_sum_gives_zeros_not_nan(backend):
    acts = torch.ones(2, 3, 4, 4)
    weights = -torch.ones(2, 3)
    out = cam_combine(acts, weights, 9, backend=backend)
    assert torch.equal(out, torch.zeros(2, 9, 9))


def test_auto_backend_non_contiguous_and_float64_fallback():
    acts = torch.randn(3, 6, 5, 4).transpose(2, 3)
    weights = torch.randn(6, 3).t()
    expected = cam_combine_ref(acts.double(), weights.double(), (8, 8))
    assert_close(cam_combine(acts, weights, 8), expected, rtol=1e-5, atol=1e-5)
    assert cam_combine(acts.double(), weights.double(), 8).dtype == torch.float64


@pytest.mark.parametrize("bad, match", [
    (dict(activations=torch.rand(3, 4, 5), weights=torch.rand(3, 4)), "activations: expected a 4-D"),
    (dict(activations=torch.rand(2, 4, 5, 5), weights=torch.rand(2, 4, 5)), "weights: expected"),
    (dict(activations=torch.rand(2, 4, 5, 5), weights=torch.rand(2, 3)), r"weights: expected \[B, K\]"),
    (dict(activations=torch.rand(2, 4, 5, 5), weights=torch.rand(2, 4, 5, 4)), r"weights: expected \[B, K, h, w\]"),
    (dict(activations=torch.rand(2, 4, 5, 5), weights=torch.rand(2)), "weights: expected a 2-D"),
    (dict(activations=torch.ones(1, 1, 2, 2, dtype=torch.long), weights=torch.rand(1, 1)), "activations: expected a floating"),
    (dict(activations=torch.rand(1, 1, 2, 2), weights=torch.rand(1, 1), size=0), "size: expected values >= 1"),
    (dict(activations=torch.rand(1, 1, 2, 2), weights=torch.rand(1, 1), backend="gpu"), "backend: expected one of"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cam_combine(**bad)
