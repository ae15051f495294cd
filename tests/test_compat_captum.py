"""cnnviz_fast.compat.captum against Captum: Captum's README example with only the import
changed, every class on the same calls (all target forms, tuples, additional_forward_args,
baselines, convergence deltas, NoiseTunnel's noise), and clear errors for what is not covered."""
import warnings

import pytest
import torch
from torch import nn

import cnnviz_fast.compat.captum as ours
from cnnviz_fast.models import shapes_cnn

captum_attr = pytest.importorskip("captum.attr")

RTOL = 1e-5


def assert_same(a, b, rtol=RTOL):
    """Equal to ``rtol`` relative to the original's scale, tuple structure included."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
    if isinstance(b, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v, rtol)
        return
    assert a.shape == b.shape, (a.shape, b.shape)
    b = b.detach()
    scale = float(b.abs().max()) or 1.0
    err = (a.detach() - b).abs()
    assert float(err.max()) <= rtol * scale, f"max difference {float(err.max()):.3e} at {int(err.argmax())} " \
                                              f"(scale {scale:.3e})"


def both(name, *ctor, **kwargs):
    """The same call on the adapter and on Captum: (ours, captum's)."""
    call = kwargs.pop("_call", "attribute")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (getattr(getattr(ours, name)(*ctor), call)(**kwargs),
                getattr(getattr(captum_attr, name)(*ctor), call)(**kwargs))


# --------------------------------------------------------------------------- Captum's README

class ToyModel(nn.Module):
    """Captum README's model."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(3, 3)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(3, 2)
        self.lin1.weight = nn.Parameter(torch.arange(-4.0, 5.0).view(3, 3))
        self.lin1.bias = nn.Parameter(torch.zeros(1, 3))
        self.lin2.weight = nn.Parameter(torch.arange(-3.0, 3.0).view(2, 3))
        self.lin2.bias = nn.Parameter(torch.ones(1, 2))

    def forward(self, input):
        return self.lin2(self.relu(self.lin1(input)))


def test_captum_readme_example():
    """Captum's README, with ``from cnnviz_fast.compat.captum import ...``: IG, DeepLift and
    NoiseTunnel on the toy model, the README's printed attributions and Captum's own numbers."""
    from cnnviz_fast.compat.captum import DeepLift, IntegratedGradients, NoiseTunnel
    model = ToyModel()
    model.eval()
    torch.manual_seed(123)
    input = torch.rand(2, 3)
    baseline = torch.zeros(2, 3)
    ig = IntegratedGradients(model)
    attributions, delta = ig.attribute(input, baseline, target=0, return_convergence_delta=True)
    readme = torch.tensor([[-0.5922, -1.5497, -1.0067], [0.0000, -0.2219, -5.1991]])
    assert torch.allclose(attributions, readme, atol=1e-4)
    assert delta.shape == (2,) and float(delta.abs().max()) < 1e-5
    peer, peer_delta = captum_attr.IntegratedGradients(model).attribute(input, baseline, target=0,
                                                                         return_convergence_delta=True)
    assert_same(attributions, peer)
    assert torch.allclose(delta, peer_delta, atol=1e-6)

    dl = DeepLift(model)
    attributions, delta = dl.attribute(input, baseline, target=0, return_convergence_delta=True)
    assert torch.allclose(attributions, readme, atol=1e-4)
    assert_same(attributions, captum_attr.DeepLift(model).attribute(input, baseline, target=0))

    torch.manual_seed(7)
    nt = NoiseTunnel(ig)
    attributions, delta = nt.attribute(input, nt_type="smoothgrad", stdevs=0.02, nt_samples=4, baselines=baseline,
                                       target=0, return_convergence_delta=True)
    torch.manual_seed(7)
    peer, peer_delta = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(model)).attribute(
        input, nt_type="smoothgrad", stdevs=0.02, nt_samples=4, baselines=baseline, target=0,
        return_convergence_delta=True)
    assert_same(attributions, peer)
    assert delta.shape == peer_delta.shape == (8,)


# --------------------------------------------------------------------------- image models, every class

@pytest.fixture(scope="module")
def net():
    return shapes_cnn().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


TARGETS = [pytest.param(2, id="int"), pytest.param([0, 4, 1], id="list"),
           pytest.param(torch.tensor([5, 1, 3]), id="tensor"), pytest.param(torch.tensor(2), id="0-d")]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["Saliency", "InputXGradient", "GuidedBackprop", "Deconvolution", "DeepLift"])
def test_gradient_methods_match_captum(net, images, name, target):
    assert_same(*both(name, net, inputs=images, target=target))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_matches_captum(net, images, method):
    kw = dict(inputs=images, baselines=0.25, target=[1, 2, 3], n_steps=6, method=method, internal_batch_size=5,
              return_convergence_delta=True)
    (attr, delta), (peer, peer_delta) = both("IntegratedGradients", net, **kw)
    assert_same(attr, peer)
    assert torch.allclose(delta, peer_delta, atol=1e-4)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_draws_captums_noise(net, images, nt_type):
    """One seed gives Captum's samples: the same numbers, batched by nt_samples_batch_size with
    a remainder batch."""
    kw = dict(inputs=images, nt_type=nt_type, nt_samples=5, nt_samples_batch_size=2, stdevs=0.2, target=[0, 1, 2])
    torch.manual_seed(11)
    a = ours.NoiseTunnel(ours.Saliency(net)).attribute(**kw)
    torch.manual_seed(11)
    b = captum_attr.NoiseTunnel(captum_attr.Saliency(net)).attribute(**kw)
    assert_same(a, b)


def test_occlusion_matches_captum(net, images):
    kw = dict(inputs=images, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=[1, 0, 2], baselines=0.5,
              perturbations_per_eval=4)
    assert_same(*both("Occlusion", net, **kw))
    tuple_kw = dict(kw, inputs=(images,), sliding_window_shapes=((3, 6, 6),), strides=3, baselines=None)
    assert_same(*both("Occlusion", net, **tuple_kw))


def test_occlusion_modes_match_captum(net, images):
    """The default incremental sweep (no fallback: warnings are errors) and the full one."""
    kw = dict(inputs=images, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=[1, 0, 2])
    peer = captum_attr.Occlusion(net).attribute(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.Occlusion(net).mode == "incremental"
        assert_same(ours.Occlusion(net).attribute(**kw), peer)
    assert_same(ours.Occlusion(net, mode="exact").attribute(**kw), peer)


def test_layer_methods_match_captum(net, images):
    layer = net.features
    assert_same(*both("LayerGradCam", net, layer, inputs=images, target=2))
    assert_same(*both("LayerGradCam", net, layer, inputs=images, target=[1, 2, 3], relu_attributions=True))
    assert_same(*both("GuidedGradCam", net, layer, inputs=images, target=4))
    assert_same(*both("GuidedGradCam", net, layer, inputs=images, target=4, interpolate_mode="bilinear"))
    assert_same(*both("LayerActivation", net, net.features[3], inputs=images))


def test_guided_grad_cam_one_pass_and_two(net, images):
    """On the last feature layer (no ReLU module after it) guided backprop and Grad-CAM share
    one pass; on an inner layer (ReLUs after it) Grad-CAM takes its own: Captum's numbers both."""
    from cnnviz_fast.compat.captum import _guided_with_cam
    assert _guided_with_cam(net, images, 4, net.features)[1] is not None
    assert _guided_with_cam(net, images, 4, net.features[0])[1] is None
    assert_same(*both("GuidedGradCam", net, net.features[0], inputs=images, target=[1, 2, 3]))


class NoBatchNormNet(nn.Module):
    """A model of the layers Captum's LRP has default rules for (no batch norm)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 5))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_lrp_matches_captum():
    torch.manual_seed(0)
    model = NoBatchNormNet().eval()
    x = torch.rand(2, 3, 16, 16)
    (attr, delta), (peer, peer_delta) = both("LRP", model, inputs=x, target=1, return_convergence_delta=True)
    assert_same(attr, peer)
    assert torch.allclose(delta, peer_delta.detach(), atol=1e-5)


# --------------------------------------------------------------------------- tuples and extra arguments

class TwoInputs(nn.Module):
    """Tabular inputs of two shapes plus a batched and a constant extra argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 3)
        self.act = nn.ReLU()

    def forward(self, a, b, scale, power=1):
        return self.lin(self.act(torch.cat([a, b.flatten(1)], 1))) * scale ** power


@pytest.mark.parametrize("name", ["Saliency", "InputXGradient", "IntegratedGradients", "DeepLift", "GuidedBackprop"])
def test_tuples_and_additional_forward_args(name):
    torch.manual_seed(0)
    model = TwoInputs()
    inputs = (torch.randn(4, 3), torch.randn(4, 2, 2))
    extra = (torch.rand(4, 1) + 0.5, 2)
    a, b = both(name, model, inputs=inputs, target=(2,), additional_forward_args=extra)
    assert isinstance(a, tuple) and len(a) == 2
    assert_same(a, b)


def test_tuple_baselines_and_target_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 5)
    baselines = (torch.full((1, 5), 0.1),)
    (a, da), (b, db) = both("IntegratedGradients", model, inputs=(x,), baselines=baselines, target=None,
                            n_steps=10, return_convergence_delta=True)
    assert_same(a, b)
    assert torch.allclose(da, db, atol=1e-5)


# --------------------------------------------------------------------------- what is not covered

@pytest.mark.parametrize("make, call, word", [
    (lambda m: ours.IntegratedGradients(m), dict(method="riemann_left"), "method"),
    (lambda m: ours.DeepLift(m), dict(custom_attribution_func=lambda *a: a), "custom_attribution_func"),
    (lambda m: ours.Occlusion(m), dict(sliding_window_shapes=(1, 4, 4)), "sliding_window_shapes"),
    (lambda m: ours.LayerGradCam(m, m.features), dict(attribute_to_layer_input=True), "attribute_to_layer_input"),
    (lambda m: ours.LayerGradCam(m, m.features), dict(attr_dim_summation=False), "attr_dim_summation"),
    (lambda m: ours.NoiseTunnel(ours.Saliency(m)), dict(draw_baseline_from_distrib=True), "draw_baseline_from_distrib"),
    (lambda m: ours.Saliency(m), dict(target=[(1,), (2,), (3,)]), "target"),
    (lambda m: ours.Saliency(m), dict(target=torch.zeros(3, 2, dtype=torch.long)), "target"),
    (lambda m: ours.LRP(m), dict(target=1), "BatchNorm2d"),
])
def test_unsupported_arguments_raise_naming_them(net, images, make, call, word):
    with pytest.raises(ValueError, match=word):
        make(net).attribute(images, **call)


def test_unsupported_constructor_arguments(net):
    with pytest.raises(ValueError, match="multiply_by_inputs"):
        ours.IntegratedGradients(net, multiply_by_inputs=False)
    with pytest.raises(ValueError, match="device_ids"):
        ours.LayerGradCam(net, net.features, device_ids=[0, 1])
    with pytest.raises(TypeError, match="attribution_method"):
        ours.NoiseTunnel(captum_attr.Saliency(net))


def test_model_left_as_found(net, images):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    ours.DeepLift(net).attribute(images, target=1)
    ours.Occlusion(net).attribute(images, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16), target=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
