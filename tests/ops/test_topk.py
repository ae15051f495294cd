"""channel_topk_update: every fast backend against the store-all reference (computed in
float64; maxima are exact, so results must be identical, ties included)."""
import pytest
import torch

from cnnviz_fast import channel_topk_update
from cnnviz_fast.reference import channel_topk_ref, channel_topk_update_ref
from cnnviz_fast.reference.topk import empty_topk
from tests.helpers import fast_backends

# (B, C, h, w, k): why each shape is here
SHAPES = [
    (1, 1, 1, 1, 1),      # batch 1, 1x1 map, k = 1
    (1, 3, 1, 1, 4),      # k larger than the images seen: empty slots stay
    (5, 7, 13, 11, 3),    # primes, H != W
    (6, 10, 3, 17, 9),    # non-power-of-2 channels, wide map
    (2, 6, 56, 56, 9),    # ResNet layer1 resolution (several 256-position tiles)
    (20, 3, 5, 5, 9),     # more images than one block of candidates
    (3, 24, 7, 7, 9),     # ResNet layer4 resolution (24 channels: one interpreted program each)
]
SEEDED = [(seed, tuple(int(v) for v in torch.randint(1, 12, (5,), generator=torch.Generator().manual_seed(seed))))
          for seed in (21, 22, 23)]
CASES = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + \
        [pytest.param(s, id=f"seed{seed}-" + "x".join(map(str, s))) for seed, s in SEEDED]


def _assert_same(got, expected, what):
    for name, g, e in zip(("values", "ids", "pos"), got, expected):
        g = g.double() if g.is_floating_point() else g
        if not torch.equal(g, e):
            bad = (g != e).nonzero()[0].tolist()
            raise AssertionError(f"{what}: {name} differ first at {bad}: got {g[tuple(bad)].item()}, "
                                 f"expected {e[tuple(bad)].item()}\ngot {g}\nexpected {e}")


def _activations(shape, ties):
    B, C, h, w, _ = shape
    if ties:  # few distinct values: equal maxima across images and within maps
        return torch.randint(0, 3, (B, C, h, w)).float()
    return torch.randn(B, C, h, w)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("backend", fast_backends())
def test_streamed_batches_match_store_all_reference(backend, shape, ties):
    B, C, h, w, k = shape
    acts = _activations(shape, ties)
    ids = torch.randperm(3 * B)[:B]  # ids need not follow the batch order
    expected = channel_topk_ref(acts.double(), ids, k)
    state = empty_topk(C, k)
    for part in torch.arange(B).tensor_split(3 if B >= 3 else 1):
        state = channel_topk_update(acts[part], ids[part], *state, backend=backend)
    _assert_same(state, expected, f"{backend} {shape}")


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_golden_order_and_first_argmax(backend):
    # channel 0: image 7 and image 3 both peak at 5.0 -> id 3 first; image 3's map holds 5.0
    # twice, at positions 1 and 2 -> the first (1) in row-major order.
    acts = torch.tensor([[[[0.0, 5.0], [5.0, 1.0]]], [[[5.0, 2.0], [0.0, 0.0]]], [[[4.0, 4.0], [4.0, 4.0]]]])
    ids = torch.tensor([3, 7, 1])
    values, out_ids, pos = channel_topk_update(acts, ids, *empty_topk(1, 4), backend=backend)
    assert values.tolist() == [[5.0, 5.0, 4.0, float("-inf")]]
    assert out_ids.tolist() == [[3, 7, 1, -1]]
    assert pos.tolist() == [[1, 0, 0, -1]]


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_inputs_untouched_and_minus_inf_maps_never_enter(backend):
    acts = torch.full((2, 2, 3, 3), float("-inf"))
    acts[1, 1, 2, 0] = -7.0
    state = empty_topk(2, 2)
    before = [t.clone() for t in state]
    values, ids, pos = channel_topk_update(acts, torch.tensor([0, 1]), *state, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    assert ids.tolist() == [[-1, -1], [1, -1]] and pos.tolist() == [[-1, -1], [6, -1]]
    assert values[1, 0].item() == -7.0 and torch.isinf(values[0]).all()


@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_nan_raises_naming_the_channel(backend):
    acts = torch.rand(3, 4, 5, 5)
    acts[2, 3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="channel 3 holds NaN"):
        channel_topk_update(acts, torch.arange(3), *empty_topk(4, 2), backend=backend)


def test_reference_equals_sorting_every_candidate():
    acts = torch.randint(0, 4, (9, 2, 3, 3)).double()
    ids = torch.arange(9)
    got = channel_topk_update_ref(acts, ids, *empty_topk(2, 5, torch.float64))
    for c in range(2):
        flat = acts[:, c].flatten(1)
        cands = sorted((-flat[b].max().item(), b, int(flat[b].argmax())) for b in range(9))[:5]
        assert [(-v, i, p) for v, i, p in cands] == list(zip(got[0][c].tolist(), got[1][c].tolist(), got[2][c].tolist()))


def _good():
    return dict(activations=torch.rand(2, 3, 4, 4), ids=torch.arange(2), running_values=empty_topk(3, 2)[0],
                running_ids=empty_topk(3, 2)[1], running_pos=empty_topk(3, 2)[2])


@pytest.mark.parametrize("change, match", [
    (dict(activations=torch.rand(2, 3, 16)), "activations: expected a 4-D"),
    (dict(ids=torch.arange(3)), r"ids: expected int64 \[2\]"),
    (dict(ids=torch.tensor([0.0, 1.0])), "ids: expected a torch.Tensor|ids: expected int64"),
    (dict(ids=torch.tensor([0, -2])), "ids: expected ids >= 0"),
    (dict(running_values=torch.zeros(4, 2)), r"running_values: expected \[3, k\]"),
    (dict(running_values=torch.zeros(3, 0)), r"running_values: expected \[3, k\] with k >= 1"),
    (dict(running_values=torch.zeros(3, 2, dtype=torch.float64)), "running_values: dtype"),
    (dict(running_ids=torch.zeros(3, 5, dtype=torch.long)), "running_ids: expected int64"),
    (dict(running_pos=torch.zeros(3, 2)), "running_pos: expected"),
])
def test_bad_input_is_named(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        channel_topk_update(**{**_good(), **change})
