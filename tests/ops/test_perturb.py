"""perturb_by_rank: every fast backend against the reference, both layouts and rank kinds."""
import pytest
import torch

from cnnviz_fast.ops import perturb_by_rank
from cnnviz_fast.reference import perturb_by_rank_ref
from tests.helpers import assert_close, fast_backends
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

# (B, C, H, W, step_begin, step_end, features_in_step): why each shape is here
SHAPES = [
    (1, 1, 1, 1, 0, 2, 1),        # 1x1 image: the clean copy and the fully removed one
    (2, 3, 13, 11, 0, 7, 20),     # primes, H != W, a last step past the end
    (3, 5, 7, 7, 2, 5, 3),        # channel count not a power of 2, a range not starting at 0
    (1, 3, 32, 32, 10, 10, 8),    # an empty range
    (2, 3, 64, 64, 0, 4, 1024),   # the default model's input
]
SEEDED = []
for seed in (31, 32):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = (int(v) for v in torch.randint(1, 12, (4,), generator=g))
    SEEDED.append((seed, (B, C, H, W, 0, int(torch.randint(1, 6, (1,), generator=g)),
                          int(torch.randint(1, H * W + 1, (1,), generator=g)))))
CASES = [pytest.param(s, id="x".join(map(str, s[:4])) + f"-steps{s[4]}:{s[5]}-k{s[6]}") for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s[:4]))) for seed, s in SEEDED]


def _ranks(B, C, H, W, per_element):
    n = C * H * W if per_element else H * W
    ranks = torch.stack([torch.randperm(n) for _ in range(B)])
    return ranks.view(B, C, H, W) if per_element else ranks.view(B, H, W)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("per_element", [False, True], ids=["pixel", "element"])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_reference(backend, shape, per_element, channels_last):
    B, C, H, W, begin, end, k = shape
    if backend == "triton" and H * W > 1024:
        pytest.skip("Triton's interpreter is slow: small shapes only")
    x, baseline = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    ranks = _ranks(B, C, H, W, per_element)
    got = perturb_by_rank(x, ranks, begin, end, k, baseline, channels_last=channels_last, backend=backend)
    expected = perturb_by_rank_ref(x.double(), ranks, begin, end, k, baseline.double())
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(got, expected, rtol=0, atol=0, what=f"{backend} {shape}")


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_broadcast_baseline_and_ties(backend):
    # Region-style ranks with ties: both pixels of rank 0 go in step 1, rank 1 in step 2.
    x = torch.arange(8.0).view(1, 2, 2, 2)
    ranks = torch.tensor([[[0, 1], [0, 2]]])
    got = perturb_by_rank(x, ranks, 0, 4, 1, torch.tensor(-1.0), backend=backend)
    assert got.shape == (4, 2, 2, 2)
    assert torch.equal(got[0], x[0])
    assert torch.equal(got[1], torch.tensor([[[-1., 1], [-1, 3]], [[-1, 5], [-1, 7]]]))
    assert torch.equal(got[2], torch.tensor([[[-1., -1], [-1, 3]], [[-1, -1], [-1, 7]]]))
    assert torch.equal(got[3], torch.full((2, 2, 2), -1.0))


def test_bad_arguments_name_themselves():
    x = torch.zeros(2, 3, 4, 4)
    ranks = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="ranks"):
        perturb_by_rank(x, ranks[:, :3], 0, 1, 1, x)
    with pytest.raises(ValueError, match="baseline"):
        perturb_by_rank(x, ranks, 0, 1, 1, torch.zeros(5))
    with pytest.raises(ValueError, match="features_in_step"):
        perturb_by_rank(x, ranks, 0, 1, 0, x)
    with pytest.raises(ValueError, match="step_begin"):
        perturb_by_rank(x, ranks, 2, 1, 1, x)
