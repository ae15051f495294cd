"""deeplift_rescale_relu_grad: every fast backend against the reference computed in float64."""
import pytest
import torch

from cnnviz_fast.ops import deeplift_rescale_relu_grad
from cnnviz_fast.reference import deeplift_rescale_relu_grad_ref
from tests.helpers import assert_close, fast_backends

# shape of one half [N, ...]: why each shape is here
SHAPES = [
    (1, 1, 1, 1),       # batch 1, 1x1 map
    (1, 64, 56, 56),    # resnet stem / layer1 activation
    (8, 512, 7, 7),     # resnet18 layer4, batch 8
    (2, 5, 13, 11),     # primes, H != W, 5 channels
    (3, 37),            # a linear layer's [B, features]
]
SEEDED = [(seed, tuple(int(v) for v in torch.randint(1, 20, (4,), generator=torch.Generator().manual_seed(seed))))
          for seed in (21, 22)]
CASES = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s))) for seed, s in SEEDED]


def stacked(shape):
    """[inputs; references] with ties (|x - x'| = 0), tiny differences and sign changes."""
    x_in, x_ref = torch.randn(shape), torch.randn(shape)
    flat_in, flat_ref = x_in.view(-1), x_ref.view(-1)
    flat_ref[::3] = flat_in[::3]                 # equal: the fallback to the plain derivative
    flat_ref[1::5] = flat_in[1::5] + 1e-12       # within eps in float32 after rounding, or equal
    return torch.cat([x_in, x_ref])


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_reference(backend, shape):
    if backend == "triton" and shape == (1, 64, 56, 56):
        pytest.skip("large for the Triton interpreter")
    x = stacked(shape)
    grad = torch.randn_like(x)
    got = deeplift_rescale_relu_grad(grad, x, 1e-10, backend=backend)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # ties are decided by the float32 difference: the float32 reference gives the same bits
    assert_close(got, deeplift_rescale_relu_grad_ref(grad, x, 1e-10), rtol=0, atol=0,
                 what=f"{backend} vs float32 reference {shape}")
    x_in, x_ref = x.chunk(2)
    keep = (x_in - x_ref).abs() >= 1e-10
    assert (~keep).any() and (keep.numel() < 3 or keep.any())  # both branches run
    expected = deeplift_rescale_relu_grad_ref(grad.double(), x.double(), 1e-10)
    keep = torch.cat([keep, keep])  # away from ties the float64 value holds
    assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-6, what=f"{backend} vs float64 {shape}")


@pytest.mark.parametrize("backend", fast_backends())
def test_channels_last_stays_channels_last(backend):
    x = stacked((2, 5, 7, 3)).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    got = deeplift_rescale_relu_grad(grad, x, 1e-10, backend=backend)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert_close(got, deeplift_rescale_relu_grad_ref(grad, x, 1e-10), rtol=0, atol=0, what=f"{backend} channels-last")


def test_reference_golden():
    x = torch.tensor([[2.0, -1.0, 3.0, 0.5, -1.0], [1.0, -2.0, 3.0, -0.5, -1.0]])
    grad = torch.tensor([[1.0, 1.0, 2.0, 4.0, 1.0], [3.0, 1.0, 5.0, 2.0, 1.0]])
    # multipliers: (2 - 1)/1 = 1; (0 - 0)/1 = 0; tie at 3 > 0: 1; (0.5 - 0)/1 = 0.5; tie at -1: 0
    factor = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 1.0, 0.5, 0.0]])
    assert torch.equal(deeplift_rescale_relu_grad_ref(grad, x, 1e-10), grad * factor)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_bad_input(backend):
    with pytest.raises(ValueError, match="x: expected \\[inputs; references\\] with an even first dimension"):
        deeplift_rescale_relu_grad(torch.zeros(3, 2), torch.zeros(3, 2), backend=backend)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        deeplift_rescale_relu_grad(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="grad: expected x's shape \\(2, 2\\)"):
        deeplift_rescale_relu_grad(torch.zeros(2, 3), torch.zeros(2, 2), backend=backend)
