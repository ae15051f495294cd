"""occlusion(): Captum's Occlusion numbers, batched; modes, targets, baselines, bad input."""
import warnings

import pytest
import torch
from torch import nn

from cnnviz_fast import occlusion
from cnnviz_fast.explain import _incremental
from cnnviz_fast.explain.occlusion import _window_positions
from tests.helpers import assert_close, occluded_outputs
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

captum_attr = pytest.importorskip("captum.attr", reason="captum is the peer the maps must equal")


class SmallNet(nn.Module):
    """conv-BN-ReLU(inplace)-maxpool, a residual add, GAP and a linear head (in eval mode)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.body(h))
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    model = SmallNet().eval()
    for p in model.stem[1].parameters():
        nn.init.uniform_(p, 0.5, 1.5)
    return model


def captum_map(model, x, target, window, stride, baseline):
    C = x.shape[1]
    return captum_attr.Occlusion(model).attribute(x, target=target, sliding_window_shapes=(C, *window),
                                                  strides=(C, *stride), baselines=baseline)[:, 0]


# (H, W, window, stride): why each case is here
CAPTUM_CASES = [
    (16, 16, (4, 4), (2, 2)),    # interior and border windows, overlap 2x2
    (23, 30, (5, 7), (3, 4)),    # H != W, sizes not divisible by the stride: clipped last windows
    (13, 11, (13, 3), (1, 3)),   # window as tall as the image: one row of windows
    (9, 17, (2, 6), (2, 5)),     # stride = window in one axis, primes
]


@pytest.mark.parametrize("H, W, window, stride", CAPTUM_CASES)
def test_equals_captum(net, H, W, window, stride):
    x = torch.randn(2, 3, H, W)
    expected = captum_map(net, x, torch.tensor([1, 3]), window, stride, 0.25)
    scale = expected.abs().max().item()
    for backend in (None, "reference"):
        got = occlusion(net, x, [1, 3], window=window, stride=stride, baseline=0.25, batch_size=7,
                        backend=backend)
        assert got.shape == (2, H, W) and got.dtype == torch.float32
        assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, what=f"{backend} vs captum {H}x{W} {window}")


@pytest.mark.parametrize("baseline", [
    pytest.param("per-channel", id="per-channel"), pytest.param("image", id="image-tensor"),
    pytest.param("batch", id="batch-tensor")])
def test_tensor_baselines_equal_captum(net, baseline):
    x = torch.randn(2, 3, 12, 10)
    b = {"per-channel": torch.tensor([0.1, -0.2, 0.3]), "image": torch.randn(3, 12, 10),
         "batch": torch.randn(2, 3, 12, 10)}[baseline]
    captum_b = b[:, None, None].expand(3, 12, 10) if baseline == "per-channel" else b
    expected = captum_map(net, x, 2, (3, 4), (2, 3), captum_b)
    got = occlusion(net, x, 2, window=(3, 4), stride=(2, 3), baseline=b)
    assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_golden_sum_model():
    # f(x) = sum of pixels, 3x3 image 0..8, 2x2 windows, stride 1, baseline 0: window drops are
    # 8 (0,0), 20 (1,0), 12 (0,1), 24 (1,1); each pixel averages the windows covering it.
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 1, bias=False))
    nn.init.ones_(model[1].weight)
    x = torch.arange(9.0).view(1, 1, 3, 3)
    got = occlusion(model, x, 0, window=2, stride=1)
    assert torch.equal(got[0], torch.tensor([[8., 10, 12], [14, 16, 18], [20, 22, 24]]))


def test_window_positions_follow_captum():
    # ceil((10 - 4) / 4) + 1 = 3 shifts per axis: 0, 4, 8 (the last clipped); top varies fastest
    pos = _window_positions(10, 6, (4, 6), (4, 3))
    assert pos.tolist() == [[0, 0], [4, 0], [8, 0]]
    assert len(_window_positions(224, 224, (16, 16), (8, 8))) == 729
    assert len(_window_positions(224, 224, (16, 16), (4, 4))) == 2809  # 53 x 53


def test_k_targets_stack_single_targets(net):
    x = torch.randn(2, 3, 12, 12)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    got = occlusion(net, x, targets, window=4, stride=2)
    assert got.shape == (2, 3, 12, 12)
    for j in range(3):
        assert_close(got[:, j], occlusion(net, x, targets[:, j], window=4, stride=2), rtol=1e-6, atol=1e-7)


def test_callable_target_equals_index_target(net):
    x = torch.randn(2, 3, 10, 10)
    got = occlusion(net, x, lambda out: out[:, 2] - out[:, 0], window=3, stride=2)
    expected = occlusion(net, x, 2, window=3, stride=2) - occlusion(net, x, 0, window=3, stride=2)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batch_size_and_budget_independent(net):
    x = torch.randn(3, 3, 11, 9)
    expected = occlusion(net, x, 1, window=4, stride=3, batch_size=1)
    for kwargs in (dict(batch_size=5), dict(batch_size=1000), dict(memory_budget=50_000), {}):
        assert_close(occlusion(net, x, 1, window=4, stride=3, **kwargs), expected, rtol=1e-5, atol=1e-6,
                     what=str(kwargs))
    # each image alone gives the same map as in the batch
    assert_close(occlusion(net, x[1:2], 1, window=4, stride=3), expected[1:2], rtol=1e-5, atol=1e-6)


def test_model_left_as_found(net):
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    try:
        with pytest.warns(UserWarning, match="training mode; cnnviz_fast explains it in eval mode"):
            occlusion(net, torch.randn(1, 3, 8, 8), 0, window=4, stride=4)
        assert net.training
        assert [p.requires_grad for p in net.parameters()] == flags
        assert all(p.grad is None for p in net.parameters())
        assert not any(m._forward_hooks for m in net.modules())
    finally:
        net.eval()


class CountingNet(nn.Module):
    """Counts the samples the wrapped model sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.samples = model, 0

    def forward(self, x):
        self.samples += x.shape[0]
        return self.model(x)


def test_drill_down_exact_limits_and_cost(net):
    x = torch.randn(2, 3, 20, 20)
    exact = occlusion(net, x, 1, window=6, stride=2)
    kw = dict(mode="approximate", tau=None, window=6, stride=2, coarse_stride=6)
    # refining every window, or a coarse stride equal to the fine one, is exact
    assert_close(occlusion(net, x, 1, refine_fraction=1.0, **kw), exact, rtol=1e-5, atol=1e-6)
    assert_close(occlusion(net, x, 1, **{**kw, "coarse_stride": 2}, refine_fraction=0.1), exact,
                 rtol=1e-5, atol=1e-6)
    # cost: 1 clean pass + 16 coarse windows + at most 10% of the 64 fine windows, per image
    counting = CountingNet(net)
    approx = occlusion(counting, x, 1, refine_fraction=0.1, **kw)
    assert counting.samples <= 2 * (1 + 16 + 7)
    # the coarse windows' own drops are exact, so the map is near the exact one where refined
    corr = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.5


def spy_engine(monkeypatch):
    """Record every list of windows occlusion() hands to the incremental engine, which still runs."""
    calls = []
    real = _incremental._Engine.outputs

    def recording(engine, baseline, positions, window, batch_size=None):
        calls.append(dict(P=len(positions), tau=engine.tau, batch_size=batch_size))
        return real(engine, baseline, positions, window, batch_size)

    monkeypatch.setattr(_incremental._Engine, "outputs", recording)
    return calls


@pytest.mark.parametrize("H, W, window, stride", CAPTUM_CASES[:2])
def test_incremental_equals_exact_and_captum(net, monkeypatch, H, W, window, stride):
    calls = spy_engine(monkeypatch)
    x = torch.randn(2, 3, H, W)
    expected = captum_map(net, x, torch.tensor([1, 3]), window, stride, 0.25)
    exact = occlusion(net, x, [1, 3], window=window, stride=stride, baseline=0.25)
    got = occlusion(net, x, [1, 3], window=window, stride=stride, baseline=0.25, mode="incremental", batch_size=5)
    P = len(_window_positions(H, W, window, stride))
    assert calls == [dict(P=P, tau=None, batch_size=5)] * 2  # one engine call per image, every window
    # the tolerance: max abs difference at most 1e-4 of the score range
    for reference in (exact, expected):
        span = (reference.max() - reference.min()).item()
        assert_close(got, reference, rtol=0, atol=1e-4 * span, what=f"incremental {H}x{W} {window}")


def test_approximate_uses_the_engine_with_tau(net, monkeypatch):
    calls = spy_engine(monkeypatch)
    x = torch.randn(2, 3, 14, 12)
    exact = occlusion(net, x, [0, 2], window=4, stride=3)
    # tau=1 caps nothing and refining every window is the exact map
    approx = occlusion(net, x, [0, 2], window=4, stride=3, mode="approximate", tau=1.0, refine_fraction=1.0)
    assert_close(approx, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert calls and all(c["tau"] == 1.0 for c in calls)


def test_compute_dtype_runs_a_converted_copy(net, monkeypatch):
    calls = spy_engine(monkeypatch)
    x = torch.randn(2, 3, 14, 12)
    exact = occlusion(net, x, [0, 2], window=4, stride=3)
    dtypes = [p.dtype for p in net.parameters()]
    approx = occlusion(net, x, [0, 2], window=4, stride=3, mode="approximate", tau=1.0, refine_fraction=1.0,
                       compute_dtype=torch.bfloat16)
    assert approx.dtype == torch.float32 and calls
    assert [p.dtype for p in net.parameters()] == dtypes  # the model itself is not converted
    # bfloat16 rounds to 2**-8 of the values: near, not equal
    span = (exact.max() - exact.min()).item()
    assert not torch.equal(approx, exact)
    assert (approx - exact).abs().max() <= 0.3 * span
    assert torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1] > 0.85
    # float64 windows of a float32 image: the exact map, in float32
    double = occlusion(net, x, [0, 2], window=4, stride=3, mode="approximate", tau=None, refine_fraction=1.0,
                       compute_dtype=torch.float64)
    assert double.dtype == torch.float32
    assert_close(double, exact, rtol=1e-4, atol=1e-5 * span)


class MLPHead(nn.Module):
    """A conv body and a two-layer head whose first Linear feeds an in-place ReLU, with a large
    bias on the scores: in bfloat16 (spacing 4 at 1000) the scores themselves would be rounded
    by more than the drops."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 6 * 5, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
        with torch.no_grad():
            self.head[3].bias += 1000.0

    def forward(self, x):
        return self.head(self.body(x))


def test_compute_dtype_keeps_the_head_in_full_precision():
    torch.manual_seed(4)
    model = MLPHead().eval()
    x = torch.randn(2, 3, 12, 10)
    exact = occlusion(model, x, [0, 2], window=4, stride=2)
    span = (exact.max() - exact.min()).item()
    kw = dict(window=4, stride=2, mode="approximate", tau=1.0, refine_fraction=1.0)
    # float64 body, float32 head whose Linear layers apply float64 weights to the change from
    # the clean input: the exact map (and the in-place ReLU did not spoil the clean values)
    # (both maps are differences of float32 scores near 1000: spacing 6.1e-5)
    assert_close(occlusion(model, x, [0, 2], compute_dtype=torch.float64, **kw), exact, rtol=0, atol=2.5e-4)
    # bfloat16 body: near the exact map, as the scores are never rounded to bfloat16 ...
    mixed = occlusion(model, x, [0, 2], compute_dtype=torch.bfloat16, **kw)
    assert mixed.dtype == torch.float32
    assert 0 < (mixed - exact).abs().max() <= 0.1 * span
    # ... which the whole model in bfloat16 (the path of untraceable models) cannot be
    whole = occlusion(model, x, [0, 2], compute_dtype=torch.bfloat16, **{**kw, "tau": None})
    assert (whole - exact).abs().max() > 0.5 * span


def test_engine_mixed_precision_leaves_the_model_alone():
    torch.manual_seed(5)
    model = MLPHead().eval()
    image = torch.randn(3, 12, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = _incremental.incremental_engine(model, image, compute_dtype=torch.bfloat16)
    positions = torch.tensor([[0, 0], [4, 6], [8, 8]])
    out = engine.outputs(torch.zeros_like(image), positions, 4)
    assert out.dtype == torch.float32 and engine.output.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == model.state_dict()[k].dtype
               for k, v in before.items())
    drops = model(image[None]) - occluded_outputs(model, image, torch.zeros_like(image), positions, (4, 4))
    assert_close(engine.output - out, drops, rtol=0, atol=0.05 * drops.abs().max().item())


class FlatInput(nn.Module):
    """``x.view(n, -1)`` on the input itself: fails on channels-last tensors."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


def test_exact_runs_channels_last_on_cpu_where_the_model_takes_it(net):
    seen = []
    handle = net.stem[0].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        x = torch.randn(2, 3, 12, 12)
        got = occlusion(net, x, [0, 2], window=4, stride=4)
    finally:
        handle.remove()
    assert seen and all(seen)  # the clean pass and every chunk of copies
    assert_close(got, captum_map(net, x, torch.tensor([0, 2]), (4, 4), (4, 4), 0.0), rtol=1e-4, atol=1e-5)
    # a model that cannot take channels-last tensors runs channels-first, same numbers
    torch.manual_seed(6)
    flat, x = FlatInput().eval(), torch.randn(2, 3, 8, 8)
    assert_close(occlusion(flat, x, 1, window=3, stride=2), captum_map(flat, x, 1, (3, 3), (2, 2), 0.0),
                 rtol=1e-4, atol=1e-5)


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_falls_back_to_exact_with_warning(net):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), DataDependent(), net).eval()
    x = torch.randn(1, 3, 10, 10)
    with pytest.warns(RuntimeWarning, match="layer '1'"):
        got = occlusion(model, x, 1, window=4, stride=2, mode="incremental")
    assert_close(got, occlusion(model, x, 1, window=4, stride=2), rtol=1e-6, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        occlusion(model, x, 1, window=4, stride=2, mode="approximate", refine_fraction=0.5)
    assert len(caught) == 1  # warned once, then the sweep stays on full inference


def test_unsupported_layer_runs_full_maps_with_warning(net):
    # bilinear upsampling mid-network: supported layers before it stay incremental
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"),
                          net).eval()
    x = torch.randn(1, 3, 12, 12)
    with pytest.warns(RuntimeWarning, match=r"layer '1' \(Upsample\)"):
        got = occlusion(model, x, 2, window=3, stride=2, mode="incremental")
    exact = occlusion(model, x, 2, window=3, stride=2)
    assert_close(got, exact, rtol=0, atol=1e-4 * (exact.max() - exact.min()).item())


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=20), r"window: \(20, 20\) is larger than the 16x16 image"),
    (dict(window=(4, 17)), "window: .* is larger than"),
    (dict(stride=0), "stride: expected values >= 1"),
    (dict(stride=(2, 0)), "stride: expected values >= 1"),
    (dict(window=4, stride=5), "stride: .* exceeds the window"),
    (dict(baseline=torch.zeros(2, 3)), "baseline: expected a scalar, 3 per-channel"),
    (dict(baseline=torch.zeros(4)), "baseline: expected a scalar"),
    (dict(baseline="grey"), "baseline: expected a number"),
    (dict(mode="fast"), "mode: expected one of"),
    (dict(batch_size=0), "batch_size: expected an int >= 1 or None"),
    (dict(target=7), "target: class 7 is out of range"),
    (dict(target=[1, 2, 3]), "target: expected an int, 2 ints"),
    (dict(mode="approximate", tau=0.0), r"tau: expected a finite number in \(0, 1\] or None"),
    (dict(mode="approximate", refine_fraction=1.5), "refine_fraction: expected"),
    (dict(mode="approximate", window=4, stride=2, coarse_stride=8), "coarse_stride: .* exceeds"),
    (dict(mode="approximate", compute_dtype=torch.int8), "compute_dtype: expected None or a floating"),
    (dict(mode="approximate", compute_dtype="bf16"), "compute_dtype: expected None or a floating"),
    (dict(x=torch.rand(3, 16, 16)), "x: expected a 4-D"),
    (dict(x=torch.ones(2, 3, 16, 16, dtype=torch.long)), "x: expected a floating"),
    (dict(backend="cuda"), "backend: expected one of"),
])
def test_bad_input_is_named(net, kwargs, match):
    args = dict(x=torch.rand(2, 3, 16, 16), target=1, window=4, stride=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        occlusion(net, args.pop("x"), args.pop("target"), **args)
