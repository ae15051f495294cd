"""incremental_gather: every fast backend against the reference, computed in float64."""
import pytest
import torch

from cnnviz_fast.ops import incremental_gather
from cnnviz_fast.reference import incremental_gather_ref
from tests.helpers import assert_close, fast_backends
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

# (P, C, H, W, rh, rw, th, tw): why each shape is here
SHAPES = [
    (1, 1, 1, 1, 1, 1, 3, 3),        # 1x1 map, P=1: a 3x3 halo that is all padding but the centre
    (3, 5, 13, 11, 4, 3, 7, 9),      # primes, H != W, halos that cross every border
    (2, 3, 9, 9, 0, 0, 4, 4),        # empty region: a plain windowed gather (the input patch)
    (4, 2, 8, 6, 8, 6, 8, 6),        # region = whole map (materializing a full map)
    (2, 64, 56, 56, 6, 6, 10, 10),   # a ResNet layer1 3x3 conv halo
    (1, 7, 5, 17, 5, 2, 9, 21),      # window wider and taller than the map
]
SEEDED = [(seed, tuple(int(v) for v in torch.randint(1, 12, (8,), generator=torch.Generator().manual_seed(seed))))
          for seed in (51, 52, 53)]
CASES = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s))) for seed, s in SEEDED]


def _inputs(P, C, H, W, rh, rw, th, tw, gen):
    rh, rw = min(rh, H), min(rw, W)
    clean = torch.randn(C, H, W, generator=gen)
    region = torch.randn(P, C, rh, rw, generator=gen) + 10
    # Regions lie inside the map, the first patch's at the top-left corner, the last's at the
    # bottom-right; windows range from far outside the map to its far side.
    ry = torch.randint(0, H - rh + 1, (P,), generator=gen)
    rx = torch.randint(0, W - rw + 1, (P,), generator=gen)
    ry[0], rx[0], ry[-1], rx[-1] = 0, 0, H - rh, W - rw
    ty = torch.randint(-th, H + 1, (P,), generator=gen)
    tx = torch.randint(-tw, W + 1, (P,), generator=gen)
    ty[0], tx[0] = -1, -1
    return clean, region, torch.stack([ry, rx], 1), torch.stack([ty, tx], 1)


@pytest.mark.parametrize("fill", [0.0, float("-inf")])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_matches_reference(backend, shape, fill):
    P, C, H, W, rh, rw, th, tw = shape
    clean, region, roff, toff = _inputs(*shape, torch.Generator().manual_seed(sum(shape)))
    expected = incremental_gather_ref(clean.double(), region.double(), roff, toff, (th, tw), fill)
    got = incremental_gather(clean, region, roff, toff, (th, tw), fill=fill, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (P, C, th, tw)
    # A pure copy: bit-exact.
    assert_close(got, expected, rtol=0, atol=0, what=f"{backend} {shape} fill={fill}")


@pytest.mark.parametrize("fill", [0.0, float("-inf")])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_dtypes_and_layouts(backend, shape, dtype, channels_last, fill):
    """16-bit floats (copied as bit patterns in C++) and channels-last maps: still a pure copy,
    and C++ keeps channels-last maps channels-last."""
    P, C, H, W, rh, rw, th, tw = shape
    clean, region, roff, toff = _inputs(*shape, torch.Generator().manual_seed(sum(shape) + 7))
    clean, region = clean.to(dtype), region.to(dtype)
    expected = incremental_gather_ref(clean.double(), region.double(), roff, toff, (th, tw), fill)
    if channels_last:
        clean = clean[None].contiguous(memory_format=torch.channels_last)[0]
        region = region.contiguous(memory_format=torch.channels_last)
    got = incremental_gather(clean, region, roff, toff, (th, tw), fill=fill, backend=backend)
    assert got.dtype == dtype and got.shape == (P, C, th, tw)
    assert_close(got.double(), expected, rtol=0, atol=0, what=f"{backend} {dtype} {shape} fill={fill}")
    if backend == "cpp" and channels_last and C > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_reference_by_hand():
    # clean 1x3x4 with values 0..11; a 1x1 region (value -1) at (1, 2); window 3x3 at (0, 1).
    clean = torch.arange(12.0).view(1, 3, 4)
    got = incremental_gather_ref(clean, -torch.ones(1, 1, 1, 1), torch.tensor([[1, 2]]),
                                 torch.tensor([[1, 2]]), (3, 3), fill=9.0)
    expected = torch.tensor([[[[-1.0, 7.0, 9.0], [10.0, 11.0, 9.0], [9.0, 9.0, 9.0]]]])
    assert torch.equal(got, expected)


def test_non_contiguous_inputs():
    clean, region, roff, toff = _inputs(3, 4, 7, 6, 3, 2, 5, 5, torch.Generator().manual_seed(3))
    clean_nc = clean.transpose(1, 2).contiguous().transpose(1, 2)
    region_nc = region.transpose(2, 3).contiguous().transpose(2, 3)
    assert_close(incremental_gather(clean_nc, region_nc, roff, toff, 5, backend="cpp"),
                 incremental_gather_ref(clean, region, roff, toff, (5, 5)), rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(clean=torch.rand(2, 3)), "clean: expected a 3-D"),
    (dict(region=torch.rand(2, 2, 3)), "region: expected a 4-D"),
    (dict(region=torch.rand(2, 3, 1, 1)), r"region: expected \[P, 2, rh, rw\]"),
    (dict(region_offsets=torch.zeros(2, 2, dtype=torch.int32)), "region_offsets: expected an int64"),
    (dict(target_offsets=torch.zeros(3, 2, dtype=torch.long)), r"target_offsets: expected an int64 tensor of shape \[2, 2\]"),
    (dict(size=0), "size: expected values >= 1"),
    (dict(backend="cuda"), "backend: expected one of"),
])
def test_bad_input_is_named(bad, match):
    args = dict(clean=torch.rand(2, 4, 4), region=torch.rand(2, 2, 1, 1), region_offsets=torch.zeros(2, 2, dtype=torch.long),
                target_offsets=torch.zeros(2, 2, dtype=torch.long), size=3)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        incremental_gather(**args)
