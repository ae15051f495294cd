"""CAM family: hand-worked goldens, agreement with Captum and torchcam, several classes per pass,
cost properties, the model left as found, bad input, and the pointing game on the default model."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast.reference.upsample import minmax_normalize_ref
from tests.helpers import assert_close, fast_backends

METHODS = [cf.grad_cam, cf.grad_cam_pp, cf.layer_cam, cf.score_cam]


class GapNet(nn.Module):
    """conv-ReLU(inplace)-conv(stride 2)-ReLU -> GAP -> fc: a GAP + linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 6, 3, padding=1, stride=2), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class SquareHeadNet(GapNet):
    """Not a GAP + linear head (squares before pooling): gradients need the VJP."""

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x) ** 2), 1))


class Golden(nn.Module):
    """x [1,1,2,2] -> 1x1 conv to channels (x, -x) -> GAP -> fc rows (1, 0.5), (2, -1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5], [2.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


X_GOLD = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)


def _raw(method, model, x, target, layer, **kw):
    return method(model, x, target, layer, relu=False, normalize=False, size=None, **kw)


def test_golden_cam_grad_cam_layer_cam():
    m, x = Golden(), X_GOLD
    xm = x[0, 0]
    # CAM, class 0: 1 * x + 0.5 * (-x) = 0.5 x
    assert_close(cf.cam(m, x, 0, relu=False, normalize=False, size=None)[0], 0.5 * xm)
    # Grad-CAM: dY/dA = fc row / 4 at every position -> weights (0.25, 0.125) and (0.5, -0.25)
    assert_close(_raw(cf.grad_cam, m, x, 0, "conv")[0], 0.125 * xm)
    assert_close(_raw(cf.grad_cam, m, x, 1, "conv")[0], 0.75 * xm)
    # LayerCAM, class 1: relu(0.5, -0.25) = (0.5, 0) -> 0.5 x
    assert_close(_raw(cf.layer_cam, m, x, 1, "conv")[0], 0.5 * xm)


def test_golden_grad_cam_pp():
    # class 0: g = (0.25, 0.125), sum A = (10, -10); alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6),
    # w = 4 positions * alpha * relu(g)
    w0 = 4 * 0.25 * 0.0625 / (2 * 0.0625 + 10 * 0.25 ** 3 + 1e-6)
    w1 = 4 * 0.125 * 0.015625 / (2 * 0.015625 - 10 * 0.125 ** 3 + 1e-6)
    expected = (w0 - w1) * X_GOLD[0, 0]
    assert_close(_raw(cf.grad_cam_pp, Golden(), X_GOLD, 0, "conv")[0], expected, rtol=1e-5, atol=1e-6)


def test_golden_score_cam():
    # masks: minmax(x) = (x - 1) / 3 and minmax(-x) = (4 - x) / 3; class 0 scores 0.5 * mean(x * mask)
    s0 = 0.5 * (1 * 0 + 2 / 3 + 3 * 2 / 3 + 4 * 1) / 4
    s1 = 0.5 * (1 * 1 + 2 * 2 / 3 + 3 / 3 + 4 * 0) / 4
    w0, w1 = (math.exp(s) / (math.exp(s0) + math.exp(s1)) for s in (s0, s1))
    assert_close(_raw(cf.score_cam, Golden(), X_GOLD, 0, "conv")[0], (w0 - w1) * X_GOLD[0, 0],
                 rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"gap": GapNet().eval(), "square": SquareHeadNet().eval()}


@pytest.mark.parametrize("head", ["gap", "square"])
@pytest.mark.parametrize("layer", ["features.2", "features"])
def test_grad_cam_matches_captum(nets, head, layer):
    captum = pytest.importorskip("captum.attr")
    model, x, t = nets[head], torch.rand(3, 3, 16, 16), torch.tensor([1, 3, 4])
    module = cf.resolve_layer(model, layer)
    attr = captum.LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
    expected = minmax_normalize_ref(captum.LayerAttribution.interpolate(attr, (16, 16), "bilinear"))[:, 0]
    assert_close(cf.grad_cam(model, x, t, layer), expected, rtol=1e-5, atol=1e-5, what="vs Captum")


def test_matches_captum_and_torchcam_on_resnet18():
    captum = pytest.importorskip("captum.attr")
    methods = pytest.importorskip("torchcam.methods")
    models = pytest.importorskip("cnnviz_fast.models")
    torch.manual_seed(0)
    model, x, t = models.resnet18().eval(), torch.rand(2, 3, 64, 64), torch.tensor([3, 900])
    for layer in ("layer3", "layer4"):  # VJP path and closed-form path
        attr = captum.LayerGradCam(model, cf.resolve_layer(model, layer)).attribute(
            x, target=t, relu_attributions=True)
        expected = minmax_normalize_ref(captum.LayerAttribution.interpolate(attr, (64, 64), "bilinear"))[:, 0]
        assert_close(cf.grad_cam(model, x, t, layer), expected, rtol=1e-4, atol=1e-4, what=layer)
    raw = dict(normalize=False, size=None)
    assert_close(cf.layer_cam(model, x, t, "layer3", **raw), _torchcam(methods.LayerCAM, model, "layer3", x, t),
                 rtol=1e-4, atol=1e-6, what="vs torchcam LayerCAM")
    assert_close(cf.cam(model, x, t, relu=False, **raw), _torchcam(methods.CAM, model, "layer4", x, t, fc_layer="fc"),
                 rtol=1e-4, atol=1e-5, what="vs torchcam CAM")


def _torchcam(cls, model, layer, x, t, **kw):
    with cls(model, layer, input_shape=tuple(x.shape[1:]), **kw) as extractor:
        with torch.no_grad() if cls.__name__ in ("CAM", "ScoreCAM") else torch.enable_grad():
            out = model(x)
        return extractor(t.tolist(), out, normalized=False)[0]


@pytest.mark.parametrize("head", ["gap", "square"])
@pytest.mark.parametrize("name, ours, layer", [
    ("GradCAM", cf.grad_cam, "features.3"),
    ("LayerCAM", cf.layer_cam, "features.3"),
    ("ScoreCAM", cf.score_cam, "features.1"),  # full input resolution: no resize order issue
])
def test_matches_torchcam_unnormalized(nets, head, name, ours, layer):
    methods = pytest.importorskip("torchcam.methods")
    model, x, t = nets[head], torch.rand(3, 3, 16, 16), torch.tensor([0, 2, 4])
    # torchcam normalizes with max + 1e-8 at the layer's resolution: compare raw maps.
    expected = _torchcam(getattr(methods, name), model, layer, x, t)
    got = ours(model, x, t, layer, normalize=False, size=None)
    assert_close(got, expected, rtol=1e-5, atol=1e-6, what=f"vs torchcam {name}")


def test_cam_matches_torchcam_and_grad_cam(nets):
    methods = pytest.importorskip("torchcam.methods")
    model, x, t = nets["gap"], torch.rand(3, 3, 16, 16), torch.tensor([0, 2, 4])
    expected = _torchcam(methods.CAM, model, "features", x, t, fc_layer="fc")
    assert_close(cf.cam(model, x, t, relu=False, normalize=False, size=None), expected, rtol=1e-5, atol=1e-6)
    # Selvaraju et al.: on a GAP + linear head Grad-CAM is CAM / (h w); equal once normalized
    assert_close(cf.cam(model, x, t), cf.grad_cam(model, x, t, "features"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("head", ["gap", "square"])
def test_k_classes_equal_one_class_at_a_time(nets, head, method):
    model, x = nets[head], torch.rand(3, 3, 16, 16)
    t = torch.tensor([[0, 1, 4], [2, 3, 3], [4, 0, 1]])
    many = method(model, x, t, "features", size=12)
    assert many.shape == (3, 3, 12, 12)
    one = torch.stack([method(model, x, t[:, j], "features", size=12) for j in range(3)], 1)
    assert_close(many, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS + [cf.cam], ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", ["reference"] + fast_backends())
def test_backends_agree_and_output_form(nets, method, backend):
    model, x = nets["gap"], torch.rand(2, 3, 12, 10)
    args = (model, x, 1) if method is cf.cam else (model, x, 1, "features")
    got = method(*args, backend=backend)
    assert got.shape == (2, 12, 10) and got.dtype == x.dtype and got.device == x.device
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert_close(got, method(*args, backend="reference"), rtol=1e-5, atol=1e-5)


def test_callable_target_and_per_sample_target(nets):
    model, x = nets["square"], torch.rand(2, 3, 16, 16)
    by_callable = cf.grad_cam(model, x, lambda out: out[:, 2] - out[:, 0], "features")
    assert by_callable.shape == (2, 16, 16)
    assert_close(cf.score_cam(model, x, lambda out: out[:, 3], "features"), cf.score_cam(model, x, 3, "features"))
    assert_close(cf.grad_cam(model, x, [3, 3], "features"), cf.grad_cam(model, x, 3, "features"))


def test_score_cam_chunks(nets):
    model, x = nets["square"], torch.rand(2, 3, 16, 16)
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, inp: calls.append(inp[0].shape[0]))
    try:
        by_5 = cf.score_cam(model, x, 1, "features", batch_size=5)
        assert calls == [2, 5, 5, 2]  # the plain pass, then 2 * 6 masked inputs in chunks of 5
        calls.clear()
        auto = cf.score_cam(model, x, 1, "features")
        assert calls == [2, 12]  # 512 MiB / (16 * 3 KiB) holds all 12
    finally:
        handle.remove()
    assert_close(by_5, auto)


def test_gap_head_needs_no_backward_and_vjp_head_runs_body_once(nets, monkeypatch):
    import cnnviz_fast.explain.cam as cam_module
    vjps, body_calls = [], []
    monkeypatch.setattr(cam_module, "score_gradients",
                        lambda scores, acts: vjps.append(scores.shape) or cf._hooks.score_gradients(scores, acts))
    t, x = torch.tensor([[0, 1, 2], [2, 3, 4]]), torch.rand(2, 3, 16, 16)
    for head in ("gap", "square"):
        handle = nets[head].features[0].register_forward_hook(lambda *a: body_calls.append(1))
        try:
            cf.grad_cam(nets[head], x, t, "features")
        finally:
            handle.remove()
    # closed form on the GAP head; one batched VJP for all three classes on the other
    assert vjps == [(2, 3)] and body_calls == [1, 1]


class NormNet(GapNet):
    """A batch-norm layer: training mode warns (batch statistics, running stats updated)."""

    def __init__(self):
        super().__init__()
        self.features.insert(1, nn.BatchNorm2d(8))


@pytest.mark.parametrize("method", METHODS + [cf.cam], ids=lambda f: f.__name__)
def test_model_left_as_found(method):
    model = NormNet().train()
    model.features[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.rand(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="training mode"):
        method(model, x, 1) if method is cf.cam else method(model, x, 1, "features")
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


class Branchy(GapNet):
    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(3, 6, 1)
        self.side = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        self.side(x)  # runs, but the output does not depend on it
        return super().forward(x)


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: cf.grad_cam(m, x, 1, "unused"), ValueError, "'unused' did not run"),
    (lambda m, x: cf.grad_cam(m, x, 1, "side"), ValueError, "do not depend on this layer"),
    (lambda m, x: cf.grad_cam(m, x, 7, "features"), ValueError, "class 7 is out of range"),
    (lambda m, x: cf.score_cam(m, x, -1, "features"), ValueError, "class -1 is out of range"),
    (lambda m, x: cf.layer_cam(m, x, 1, "fc"), ValueError, "2-D output"),
    (lambda m, x: cf.grad_cam(m, x, 1, "featurs"), ValueError, "no module named 'featurs'"),
    (lambda m, x: cf.grad_cam(m, x[0], 1, "features"), ValueError, "x: expected a 4-D"),
    (lambda m, x: cf.cam(m, x, 1, layer="features.2"), ValueError, "not global-average-pooled"),
    (lambda m, x: cf.cam(nn.Sequential(nn.Conv2d(3, 2, 1)), x, 1), ValueError, "no nn.Linear head"),
    (lambda m, x: cf.cam(m, x, lambda o: o[:, 0]), TypeError, "not a callable"),
    (lambda m, x: cf.score_cam(m, x, 1, "features", batch_size=0), ValueError, "batch_size"),
])
def test_bad_input_is_named(call, error, match):
    torch.manual_seed(0)
    with pytest.raises(error, match=match):
        call(Branchy().eval(), torch.rand(2, 3, 8, 8))


def test_cam_finds_layer_and_rejects_other_heads(nets):
    model, x = nets["gap"], torch.rand(2, 3, 16, 16)
    assert_close(cf.cam(model, x, 2), cf.cam(model, x, 2, layer="features", fc="fc"))
    with pytest.raises(ValueError, match="found no layer"):
        cf.cam(nets["square"], x, 2)


@pytest.fixture(scope="module")
def default_model():
    """The embedded default model and 200 held-out shapes images (seed=1; training used seed 0)."""
    models = pytest.importorskip("cnnviz_fast.models")
    data = pytest.importorskip("cnnviz_fast.data")
    held_out = data.shapes(200, seed=1)
    return (models.shapes_cnn(), models.SHAPES_CNN_CAM_LAYER, held_out.images,
            torch.as_tensor(held_out.labels), torch.as_tensor(held_out.masks))


def _pearson(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_default_model_cam_and_grad_cam_agree(default_model):
    model, layer, x, labels, _ = default_model
    raw = dict(relu=False, normalize=False, size=None)
    cams = cf.cam(model, x, labels, layer=layer, **raw)
    # A callable target takes the autograd path (VJP through GAP + fc), not the closed form.
    by_vjp = cf.grad_cam(model, x, lambda out: out.gather(1, labels[:, None])[:, 0], layer, **raw)
    corr = _pearson(cams, by_vjp)
    assert float(corr.min()) > 0.99, f"CAM vs Grad-CAM correlation: min {float(corr.min()):.4f}"
    assert_close(cf.grad_cam(model, x, labels, layer), cf.cam(model, x, labels, layer=layer),
                 rtol=1e-5, atol=1e-5, what="default outputs")


def test_default_model_matches_captum_and_torchcam(default_model):
    captum = pytest.importorskip("captum.attr")
    methods = pytest.importorskip("torchcam.methods")
    model, layer, x, labels, _ = default_model
    x, t = x[:8], labels[:8]
    attr = captum.LayerGradCam(model, cf.resolve_layer(model, layer)).attribute(x, target=t, relu_attributions=True)
    expected = minmax_normalize_ref(captum.LayerAttribution.interpolate(attr, (64, 64), "bilinear"))[:, 0]
    assert_close(cf.grad_cam(model, x, t, layer), expected, rtol=1e-4, atol=1e-4, what="vs Captum")
    expected = _torchcam(methods.CAM, model, layer, x, t, fc_layer="fc")
    assert_close(cf.cam(model, x, t, layer=layer, relu=False, normalize=False, size=None), expected,
                 rtol=1e-4, atol=1e-4, what="vs torchcam CAM")
    # cam finds the GAP layer and the fc head of the default model by itself
    assert_close(cf.cam(model, x, t), cf.cam(model, x, t, layer=layer, fc="fc"), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["cam", "grad_cam"])
def test_default_model_pointing_game(default_model, method):
    """The map's maximum (default outputs: ReLU, min-max, input size) lies inside the shape's
    mask for at least 90% of held-out images (the issue's target)."""
    model, layer, x, labels, masks = default_model
    maps = cf.cam(model, x, labels, layer=layer) if method == "cam" else cf.grad_cam(model, x, labels, layer)
    peak = maps.flatten(1).argmax(1)
    hit = masks.flatten(1).gather(1, peak[:, None]).squeeze(1).float()
    fraction = hit.mean().item()
    print(f"pointing game {method}: {fraction:.3f} of {len(hit)} held-out images")
    assert fraction >= 0.9, f"pointing game {method}: {fraction:.3f} of {len(hit)} held-out images (need >= 0.90)"


def test_training_mode_with_dropout_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="training mode; cnnviz_fast explains it in eval mode"):
        cf.grad_cam(model.train(), torch.rand(1, 3, 8, 8), 0, "0")
