"""gram: every fast backend against the reference computed in float64, forward and backward."""
import pytest
import torch

from cnnviz_fast.ops import gram
from cnnviz_fast.reference import gram_ref
from tests.helpers import assert_close, fast_backends

# [B, C, H, W]: why each shape is here
SHAPES = [
    (1, 1, 1, 1),       # batch 1, 1x1 map, one channel
    (2, 5, 13, 11),     # primes, H != W, 5 channels
    (3, 70, 4, 5),      # C not a multiple of the C++ block (64) nor of Triton's 32
    (1, 64, 56, 56),    # VGG conv1 at 56 px: long reduction
    (8, 512, 7, 7),     # VGG conv5, batch 8: many blocks, short reduction
]
SEEDED = [(seed, tuple(int(v) for v in torch.randint(1, 12, (4,), generator=torch.Generator().manual_seed(seed))))
          for seed in (31, 32)]
CASES = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s))) for seed, s in SEEDED]
_TRITON_LARGE = {(1, 64, 56, 56), (8, 512, 7, 7)}


def _skip_large(backend, shape):
    if backend == "triton" and shape in _TRITON_LARGE:
        pytest.skip("large for the Triton interpreter")


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_forward_and_backward_match_reference(backend, shape):
    _skip_large(backend, shape)
    x = torch.randn(shape)
    upstream = torch.randn(shape[0], shape[1], shape[1])
    x_fast = x.clone().requires_grad_(True)
    got = gram(x_fast, backend=backend)
    assert got.dtype == torch.float32 and got.shape == upstream.shape
    got.backward(upstream)
    x64 = x.double().requires_grad_(True)
    want = gram_ref(x64)
    want.backward(upstream.double())
    B, C, H, W = shape
    # float32 rounding of a length-H*W reduction, relative to the 1/(C*H*W) normalization
    assert_close(got, want, rtol=1e-5, atol=1e-6 * (H * W) ** 0.5 / (C * H * W) ** 0.5, what="gram")
    assert_close(got, got.transpose(1, 2), rtol=0, atol=0, what="symmetry")
    assert_close(x_fast.grad, x64.grad, rtol=1e-5, atol=1e-6 * C ** 0.5 / (H * W) ** 0.5 * upstream.abs().max().item()
                 / (C * H * W) ** 0.5, what="grad")


def test_reference_hand_worked():
    # one image, two channels over two positions: F = [[1, 2], [3, 4]]; F F^T = [[5, 11], [11, 25]]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    assert torch.equal(gram_ref(x), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gram(t, backend=backend), (x,))


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("backend", fast_backends()[:1])
def test_gradcheck_float32(backend):
    # the C++ backend runs float32 only: float32-sized finite-difference steps (Triton: float64 above)
    x = torch.randn(2, 3, 2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gram(t, backend=backend) * 60, (x,), eps=1e-2, atol=2e-2, rtol=1e-2)


def test_bad_input():
    with pytest.raises(ValueError, match="features: expected a 4-D"):
        gram(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="features: expected a floating-point"):
        gram(torch.zeros(1, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="features: expected C, H, W >= 1"):
        gram(torch.zeros(1, 2, 0, 3))
    assert gram(torch.zeros(0, 2, 3, 3)).shape == (0, 2, 2)
    with pytest.raises(ValueError, match="backend='cpp' takes"):
        gram(torch.zeros(1, 2, 3, 3, dtype=torch.float64), backend="cpp")
