"""occlusion_copies / occlusion_scatter: every fast backend against the reference in float64."""
import pytest
import torch

from cnnviz_fast.explain.occlusion import _window_positions
from cnnviz_fast.ops import occlusion_copies, occlusion_scatter
from cnnviz_fast.reference import occlusion_copies_ref, occlusion_scatter_ref
from tests.helpers import assert_close, fast_backends
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

# (N, C, H, W, window, stride): why each shape is here
SHAPES = [
    (1, 1, 1, 1, (1, 1), (1, 1)),      # 1x1 image, one window
    (2, 3, 13, 11, (5, 3), (3, 2)),    # primes, H != W, clipped border windows
    (1, 5, 7, 7, (7, 7), (1, 1)),      # window = image: one window, non-power-of-2 channels
    (3, 3, 32, 32, (8, 8), (4, 4)),    # a batch of small RGB images
    (1, 3, 224, 224, (16, 16), (8, 8)),  # the benchmark's image and window
]
SEEDED = []
for seed in (21, 22):
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = (int(v) for v in torch.randint(1, 20, (4,), generator=g))
    wh, ww = int(torch.randint(1, H + 1, (1,), generator=g)), int(torch.randint(1, W + 1, (1,), generator=g))
    SEEDED.append((seed, (N, C, H, W, (wh, ww), (max(1, wh // 2), max(1, ww // 2)))))
CASES = [pytest.param(s, id="x".join(map(str, s[:4])) + f"-w{s[4]}-s{s[5]}") for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s[:4]))) for seed, s in SEEDED]


def _pairs(N, H, W, window, stride, limit):
    """A shuffled subset of the (image, window) pairs (Triton's interpreter is slow: fewer)."""
    pos = _window_positions(H, W, window, stride)
    idx = torch.arange(N).repeat_interleave(len(pos))
    perm = torch.randperm(len(idx))[:limit]
    return idx[perm], pos.repeat(N, 1)[perm]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_copies_match_reference(backend, shape):
    N, C, H, W, window, stride = shape
    images, baselines = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    idx, pos = _pairs(N, H, W, window, stride, limit=6 if backend == "triton" else 16)
    out = torch.full((len(idx), C, H, W), float("nan"))  # poisoned: every element must be written
    got = occlusion_copies(images, baselines, idx, pos, window, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()
    expected = occlusion_copies_ref(images.double(), baselines.double(), idx, pos, window)
    assert_close(got, expected, rtol=0, atol=0, what=f"{backend} copies {shape}")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_scatter_matches_reference(backend, shape, k):
    N, C, H, W, window, stride = shape
    idx, pos = _pairs(N, H, W, window, stride, limit=12 if backend == "triton" else 200)
    drops = torch.randn(len(idx), k)
    sums, counts = torch.randn(N, k, H, W), torch.rand(N, H, W)  # accumulated into, not overwritten
    exp_sums, exp_counts = occlusion_scatter_ref(drops.double(), idx, pos, window, sums.double(), counts.double())
    occlusion_scatter(drops, idx, pos, window, sums, counts, backend=backend)
    # each pixel sums at most ceil(h/sh) * ceil(w/sw) drops
    overlap = -(-window[0] // stride[0]) * -(-window[1] // stride[1])
    assert_close(sums, exp_sums, rtol=1e-6, atol=1e-6 * overlap, what=f"{backend} sums {shape}")
    assert_close(counts, exp_counts, rtol=1e-6, atol=0, what=f"{backend} counts {shape}")


def test_reference_scatter_golden():
    # 3x4 image, 2x2 windows at (0,0) and (1,2): hand-worked sums and counts.
    pos = torch.tensor([[0, 0], [1, 2]])
    idx = torch.tensor([0, 0])
    sums, counts = occlusion_scatter_ref(torch.tensor([[2.0], [5.0]]), idx, pos, (2, 2),
                                         torch.zeros(1, 1, 3, 4), torch.zeros(1, 3, 4))
    assert torch.equal(sums[0, 0], torch.tensor([[2., 2, 0, 0], [2, 2, 5, 5], [0, 0, 5, 5]]))
    assert torch.equal(counts[0], torch.tensor([[1., 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]))


def test_reference_copies_clip_at_border():
    images = torch.arange(12.0).view(1, 1, 3, 4)
    got = occlusion_copies_ref(images, torch.full_like(images, -1), torch.tensor([0]), torch.tensor([[2, 3]]), (2, 2))
    expected = images.clone()
    expected[0, 0, 2, 3] = -1
    assert torch.equal(got[0], expected[0])


def test_scatter_with_1d_drops_and_auto_backend():
    idx, pos = torch.tensor([0, 1]), torch.tensor([[0, 0], [1, 1]])
    sums, counts = torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3)
    occlusion_scatter(torch.tensor([1.5, -2.0]), idx, pos, 2, sums, counts)
    assert sums[0, 0, :2, :2].eq(1.5).all() and sums[1, 0, 1:, 1:].eq(-2.0).all()
    assert counts.sum().item() == 8


@pytest.mark.parametrize("call, match", [
    (lambda: occlusion_copies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 3), torch.tensor([0]),
                              torch.tensor([[0, 0]]), 2), "baselines: expected"),
    (lambda: occlusion_copies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.tensor([1]),
                              torch.tensor([[0, 0]]), 2), "image_index: values must lie"),
    (lambda: occlusion_copies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.tensor([0]),
                              torch.tensor([[4, 0]]), 2), "positions: window corners"),
    (lambda: occlusion_copies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.tensor([0]),
                              torch.tensor([0, 0]), 2), "positions: expected a 2-D"),
    (lambda: occlusion_copies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.tensor([0]),
                              torch.tensor([[0, 0]]), 2, out=torch.empty(2, 1, 4, 4)), "out: expected"),
    (lambda: occlusion_scatter(torch.rand(1, 2), torch.tensor([0]), torch.tensor([[0, 0]]), 2,
                               torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4)), "drops: expected 1 values"),
    (lambda: occlusion_scatter(torch.rand(1), torch.tensor([0]), torch.tensor([[0, 0]]), 2,
                               torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 5)), "counts: expected"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
