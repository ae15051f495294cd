"""Incremental inference (Krypton) equals full re-inference of the occluded copies."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnviz_fast.explain._incremental import UnsupportedModel, incremental_outputs, theoretical_flop_ratio
from cnnviz_fast.explain.occlusion import _window_positions
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)
from tests.helpers import occluded_outputs


def assert_matches_full(model, image, positions, window, baseline=None, **kw):
    baseline = torch.zeros_like(image) if baseline is None else baseline
    expected = occluded_outputs(model, image, baseline, positions, window)
    got = incremental_outputs(model, image, baseline, positions, window, **kw)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    span = (expected.max() - expected.min()).item()
    err = (got - expected).abs().max().item()
    # The tolerance: max abs difference at most 1e-4 of the score range.
    assert err <= 1e-4 * span, f"max abs err {err:.3g} > 1e-4 * range {span:.3g}"
    return got


def sweep(H, W, window, stride):
    """Captum's window corners: every stride from 0, the last windows clipped at the border."""
    return _window_positions(H, W, window, stride)


def pick(positions, n, seed):
    """n positions: the four corners of the sweep and random others."""
    corners = torch.stack([positions.min(0).values, positions.max(0).values,
                           torch.stack([positions[:, 0].min(), positions[:, 1].max()]),
                           torch.stack([positions[:, 0].max(), positions[:, 1].min()])])
    rest = positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:n - 4]]
    return torch.cat([corners, rest])


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class Block(nn.Module):
    """A ResNet basic block: conv-bn-relu(in place), conv-bn, downsample, out += identity."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.downsample(x)
        return self.relu(out)


class Branchy(nn.Module):
    """Concatenation, functional ops, scalar arithmetic and a constant tensor operand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, (3, 5), padding=(1, 2))
        self.c = nn.Conv2d(9, 6, 3, padding="same", dilation=2)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = self.c(y) * self.scale + 0.5
        y = self.pool(torch.tanh(y))
        return self.head(y.mean((2, 3)))


def small_nets():
    torch.manual_seed(1)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
        nn.AvgPool2d(3, 2, 1),                      # count_include_pad with padding
        nn.Conv2d(12, 12, 3, padding=1, groups=4), nn.LeakyReLU(0.1),
        nn.MaxPool2d(2, 2, dilation=1, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    resnet = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                           nn.MaxPool2d(3, 2, 1), Block(8, 8, 1), Block(8, 16, 2),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    # An unsupported layer (bilinear upsampling) mid-network: full maps from there on.
    fully_conv = nn.Sequential(nn.Conv2d(3, 6, 5, 2, 2), nn.ReLU(), nn.Upsample(scale_factor=2, mode="bilinear"),
                               nn.Conv2d(6, 2, 3, padding=1))
    return {"plain": randomize_bn(plain), "resnet": randomize_bn(resnet), "branchy": Branchy().eval(),
            "fully_conv": fully_conv.eval()}


NETS = small_nets()

# (net, H, W, window, stride): odd sizes not divisible by the stride, H != W, windows at borders
CASES = [
    ("plain", 37, 41, (5, 7), (4, 3)),
    ("plain", 32, 32, (8, 8), (8, 8)),
    ("resnet", 45, 38, (6, 6), (5, 4)),
    ("resnet", 33, 33, (3, 9), (2, 7)),
    ("branchy", 29, 31, (4, 4), (3, 3)),
    ("fully_conv", 21, 18, (5, 3), (4, 5)),
]


@pytest.mark.parametrize("name, H, W, window, stride", [pytest.param(*c, id=f"{c[0]}-{c[1]}x{c[2]}-w{c[3]}-s{c[4]}")
                                                        for c in CASES])
def test_small_nets_match_full_inference(name, H, W, window, stride):
    image = torch.randn(3, H, W)
    positions = pick(sweep(H, W, window, stride), 9, seed=H * W)
    if name != "fully_conv":
        assert_matches_full(NETS[name], image, positions, window, baseline=torch.rand(3, H, W), batch_size=4)
        return
    with pytest.warns(RuntimeWarning, match=r"layer '2' \(Upsample\).* full maps"):
        assert_matches_full(NETS[name], image, positions, window, baseline=torch.rand(3, H, W), batch_size=4)


def test_batch_size_independent_and_order_kept():
    model, image = NETS["resnet"], torch.randn(3, 40, 40)
    positions = sweep(40, 40, (7, 7), (5, 5))
    baseline = torch.full_like(image, 0.3)
    one = incremental_outputs(model, image, baseline, positions, 7, batch_size=1)
    for bs in (5, 64, None):
        assert torch.allclose(incremental_outputs(model, image, baseline, positions, 7, batch_size=bs), one,
                              rtol=0, atol=1e-5 * one.abs().max().item())
    # The output row of each position is its own: reversed positions give reversed rows.
    rev = incremental_outputs(model, image, baseline, positions.flip(0), 7, batch_size=3)
    assert torch.allclose(rev.flip(0), one, rtol=0, atol=1e-5 * one.abs().max().item())


class SizeFirst(nn.Module):
    """Reads the batch size before its convolutions and uses it in the head (a non-tensor
    value that crosses from the body into the head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        n = x.shape[0]
        return self.fc(self.conv(x).reshape(n, -1))


@pytest.mark.parametrize("model", [NETS["plain"], NETS["resnet"], SizeFirst().eval()], ids=["plain", "resnet", "size"])
def test_head_runs_on_several_batches_at_once(model, monkeypatch):
    """The head (flatten, linear) runs on the stacked body outputs of many batches, or per
    batch when a body value is not a tensor of the batch; equal to full inference either way,
    and with chunks smaller than one batch."""
    from cnnviz_fast.explain import _incremental
    image = torch.randn(3, 16, 16)
    positions = sweep(16, 16, (4, 4), (3, 3))
    calls = []
    real = _incremental._Engine._run_head
    monkeypatch.setattr(_incremental._Engine, "_run_head", lambda self, states, P: calls.append(P) or real(self, states, P))
    assert_matches_full(model, image, positions, (4, 4), batch_size=4)
    assert sum(calls) == len(positions)
    if isinstance(model, SizeFirst):
        assert max(calls) <= 4
    else:
        assert max(calls) > 4, "the head ran batch by batch"
    monkeypatch.setattr(_incremental, "_HEAD_CHUNK_BYTES", 1)
    calls.clear()
    assert_matches_full(model, image, positions, (4, 4), batch_size=4)
    assert max(calls) <= 4 and sum(calls) == len(positions)


class ViewHead(nn.Module):
    """``x.view(n, -1)`` into the head, as older models write it: it fails on the channels-last
    maps the engine uses on CPU, so such layers must get channels-first tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 6 * 5, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.size(0), -1))


def test_layers_outside_the_engine_get_channels_first_tensors():
    image = torch.randn(3, 12, 10)
    assert_matches_full(ViewHead().eval(), image, sweep(12, 10, (3, 3), (2, 2)), (3, 3), batch_size=4)


def test_batches_partition_the_patches_and_bound_padding():
    from cnnviz_fast.explain._incremental import incremental_engine
    model, image = NETS["resnet"], torch.randn(3, 45, 38)
    engine = incremental_engine(model, image)
    positions = sweep(45, 38, (6, 6), (5, 4)).numpy()
    plan = engine.plan(positions, (6, 6))
    for batch_size in (1, 3, 16):
        order, batches = engine._batches(plan, batch_size)
        assert sorted(order.tolist()) == list(range(len(positions)))
        assert batches[0][0] == 0 and batches[-1][1] == len(positions)
        assert all(e0 == s1 for (_, e0), (s1, _) in zip(batches, batches[1:]))
        assert all(0 < e - s <= batch_size for s, e in batches)
    # Patches with the same boxes pad nothing: full batches.
    same = np.repeat(positions[len(positions) // 2][None], 9, 0)
    order, batches = engine._batches(engine.plan(same, (6, 6)), 4)
    assert [e - s for s, e in batches] == [4, 4, 1]


def test_whole_image_window_and_single_position():
    model, image = NETS["plain"], torch.randn(3, 16, 20)
    assert_matches_full(model, image, torch.tensor([[0, 0]]), (16, 20))
    assert_matches_full(model, image, torch.tensor([[15, 19]]), (1, 1))
    # a window running past the bottom-right corner is clipped there (Captum's last windows)
    assert_matches_full(model, image, torch.tensor([[13, 17]]), (5, 5))


def test_model_left_as_found():
    model = NETS["resnet"]
    flags = [p.requires_grad for p in model.parameters()]
    incremental_outputs(model, torch.randn(3, 24, 24), torch.zeros(3, 24, 24), torch.tensor([[2, 3]]), 4)
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_engines_of_one_call_share_converted_weights():
    """The engines of one call (one per image) share the compute_dtype copies of the body's
    modules, the head's converted Linear weights and the channels-last conv weights; float64
    windows of float32 images give float32 outputs equal to full inference."""
    from cnnviz_fast.explain._incremental import incremental_engine
    model, cache = NETS["resnet"], {}
    images = torch.randn(2, 3, 24, 24)
    engines = [incremental_engine(model, image, compute_dtype=torch.float64, cache=cache) for image in images]
    # each engine traces the model: its nodes are its own, their names are shared
    a, b = ({n.name: v for n, v in e.lowered.items()} for e in engines)
    assert a and a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    a, b = ({n.name: v for n, v in e.head_weights.items()} for e in engines)
    assert a and a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    assert all(p.dtype == torch.float64 for m in engines[0].lowered.values() for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    positions = torch.tensor([[0, 0], [9, 13], [20, 20]])
    for engine, image in zip(engines, images):
        # on CPU the body's maps are channels-last
        conv = next(n for n in engine.window if isinstance(engine.lowered[n], nn.Conv2d))
        assert engine.clean[conv].is_contiguous(memory_format=torch.channels_last)
        got = engine.outputs(torch.zeros_like(image), positions, 4)
        expected = occluded_outputs(model, image, torch.zeros_like(image), positions, (4, 4))
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    n_channels_last = sum(1 for (_, key) in cache if key is torch.channels_last)
    assert n_channels_last == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_tau_caps_regions():
    model, image = NETS["plain"], torch.randn(3, 48, 48)
    positions = torch.tensor([[20, 20], [0, 40]])
    exact = occluded_outputs(model, image, torch.zeros_like(image), positions, (6, 6))
    # tau = 1 caps nothing: exact.
    assert_matches_full(model, image, positions, (6, 6), tau=1.0)
    # A small tau truncates the projective fields: an approximation, not the exact outputs.
    approx = incremental_outputs(model, image, torch.zeros_like(image), positions, 6, tau=0.2)
    assert torch.isfinite(approx).all() and not torch.allclose(approx, exact, atol=1e-4)
    # Only 1x1 convolutions and pointwise layers: fields never grow past the window, tau is exact.
    pointwise = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    assert_matches_full(pointwise, image, positions, (6, 6), tau=0.2)


def test_theoretical_flop_ratio_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))
    # 8x8 map, 2x2 window: inside, the changed outputs are 4x4 of 64; at a corner 3x3.
    assert theoretical_flop_ratio(model, (1, 8, 8), torch.tensor([[3, 3]]), 2) == pytest.approx(4.0)
    assert theoretical_flop_ratio(model, (1, 8, 8), torch.tensor([[3, 3], [0, 0]]), 2) == pytest.approx(64 / 12.5)
    # Linear layers run in full: they add the same MACs (64 x 16) to both counts; the conv
    # costs 9 MACs per output.
    head = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(), nn.Linear(64, 16))
    assert theoretical_flop_ratio(head, (1, 8, 8), torch.tensor([[3, 3]]), 2) == \
        pytest.approx((64 * 9 + 1024) / (16 * 9 + 1024))


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), DataDependent(), nn.ReLU())
    with pytest.raises(UnsupportedModel, match="'1'") as info:
        incremental_outputs(model, torch.randn(3, 8, 8), torch.zeros(3, 8, 8), torch.tensor([[0, 0]]), 2)
    assert info.value.layer == "1"


@pytest.mark.parametrize("bad, match", [
    (dict(positions=torch.tensor([[0, 8]])), "positions: every window"),
    (dict(positions=torch.tensor([[-1, 0]])), "positions: every window"),
    (dict(positions=torch.tensor([[0.0, 0.0]])), "positions: expected an int64"),
    (dict(window=9), "window: .* larger than the image"),
    (dict(window=0), "window: expected values >= 1"),
    (dict(baseline=torch.zeros(3, 8, 7)), "baseline: expected shape"),
    (dict(image=torch.zeros(1, 3, 8, 8)), "image: expected a 3-D"),
    (dict(tau=0.0), "tau: expected"),
    (dict(batch_size=0), "batch_size: expected"),
])
def test_bad_input_is_named(bad, match):
    args = dict(model=NETS["plain"], image=torch.randn(3, 8, 8), baseline=torch.zeros(3, 8, 8),
                positions=torch.tensor([[0, 0]]), window=4)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        incremental_outputs(**args)


# ----- the project's models (random weights, eval mode), 64-96 px, a handful of positions -----

MODELS = [("alexnet", 67, (11, 11), (9, 9)), ("vgg16", 64, (8, 8), (6, 6)), ("vgg16_bn", 64, (9, 5), (7, 7)),
          ("resnet18", 70, (16, 16), (8, 8)), ("resnet50", 64, (10, 10), (5, 5)), ("shapes_cnn", 64, (8, 8), (4, 4))]


@pytest.mark.parametrize("name, size, window, stride", [pytest.param(*m, id=m[0]) for m in MODELS])
def test_project_models_match_full_inference(name, size, window, stride):
    models = pytest.importorskip("cnnviz_fast.models")
    torch.manual_seed(3)
    model = models.shapes_cnn(pretrained=True) if name == "shapes_cnn" else randomize_bn(getattr(models, name)())
    image = torch.rand(3, size, size)
    positions = pick(sweep(size, size, window, stride), 6, seed=size)
    assert_matches_full(model.eval(), image, positions, window, batch_size=4)

