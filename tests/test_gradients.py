"""Gradient attributions: parity with Captum on real architectures, golden tiny nets, axioms
(IG completeness, DeepLIFT summation-to-delta, implementation invariance), [B, k] targets,
the model left as found, bad input."""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from cnnviz_fast import (deconvnet, deeplift, guided_backprop, integrated_gradients, saliency, smoothgrad,
                         to_map)
from tests.helpers import k_target_columns

captum_attr = pytest.importorskip("captum.attr")

RTOL = 1e-5  # float32 parity with Captum, relative to the attribution scale (see assert_attr_close)


def assert_attr_close(actual, expected, rtol=RTOL, what="attribution"):
    """Every element within ``rtol`` times its sample's attribution scale, the largest |value|
    of ``expected`` over that sample's features (per target for a k axis)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype and actual.device == expected.device, what
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values at {(~torch.isfinite(a)).nonzero()[:5].tolist()}"
    lead = e.dim() - 3
    scale = e.abs().flatten(lead).amax(-1).clamp_min(1e-30).view(*e.shape[:lead], 1, 1, 1)
    rel = (a - e).abs() / scale
    if bool((rel > rtol).any()):
        idx = tuple((rel > rtol).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int((rel > rtol).sum())} of {rel.numel()} differ; first at {idx}: got "
                             f"{a[idx].item():.9g}, expected {e[idx].item():.9g}; max relative error "
                             f"{rel.max().item():.3g} (scale {scale.flatten()[:4].tolist()})")


def tiny_net(inplace=True, pool=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace)]
    layers += [nn.MaxPool2d(3, 2, padding=1)] if pool else [nn.AvgPool2d(2)]
    layers += [nn.Conv2d(6, 8, 3), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
               nn.Linear(32, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 5)]
    return nn.Sequential(*layers).eval()


class _PerCallReLU(nn.Module):
    """Stands for a ReLU module that a block calls ``calls`` times per forward pass: call i goes
    to copy ``i % calls``, so every call has a module of its own."""

    def __init__(self, relu, calls):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(relu) for _ in range(calls))
        self.calls = 0

    def forward(self, x):
        out = self.copies[self.calls % len(self.copies)](x)
        self.calls += 1
        return out


def unique_relus(model):
    """A copy of a ResNet whose blocks call distinct ReLU modules: Captum's DeepLift rejects a
    module used twice (torchvision's BasicBlock.relu / Bottleneck.relu), our deeplift does not."""
    model = copy.deepcopy(model)
    for block in model.modules():
        calls = {"BasicBlock": 2, "Bottleneck": 3}.get(type(block).__name__)
        if calls:
            block.relu = _PerCallReLU(block.relu, calls)
    return model


# --------------------------------------------------------------------------- Captum parity

def _build(name):
    from cnnviz_fast import models
    torch.manual_seed(0)
    if name == "shapes_cnn":
        return models.shapes_cnn(pretrained=True).eval(), 32
    size = {"alexnet": 64, "vgg16_bn": 32, "resnet18": 32}[name]  # the smallest inputs each net takes
    model = getattr(models, name)(num_classes=10).eval()
    for m in model.modules():  # random BN statistics so batch norm is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, size


@pytest.fixture(scope="module", params=["alexnet", pytest.param("vgg16_bn", marks=pytest.mark.slow), "resnet18",
                                        "shapes_cnn"])
def arch(request):
    model, size = _build(request.param)
    torch.manual_seed(1)
    x = torch.rand(2, 3, size, size)
    x = (x - x.flatten(1).amin(1).view(-1, 1, 1, 1)) / (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    return request.param, model, x, [1, 4]


def _captum(cls, model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(*args, **kwargs)


def test_saliency_guided_deconvnet_match_captum(arch):
    name, model, x, t = arch
    assert_attr_close(saliency(model, x, t), _captum(captum_attr.Saliency, model, x, target=t), what=f"{name} saliency")
    assert_attr_close(saliency(model, x, t, abs=False),
                      _captum(captum_attr.Saliency, model, x, target=t, abs=False), what=f"{name} signed saliency")
    assert_attr_close(guided_backprop(model, x, t), _captum(captum_attr.GuidedBackprop, model, x, target=t),
                      what=f"{name} guided backprop")
    assert_attr_close(deconvnet(model, x, t), _captum(captum_attr.Deconvolution, model, x, target=t),
                      what=f"{name} deconvnet")


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_match_captum(arch, method):
    name, model, x, t = arch
    baseline = torch.rand(1, *x.shape[1:]) * 0.5
    attr, delta = integrated_gradients(model, x, t, baseline=baseline, steps=5, method=method, return_delta=True,
                                       channels_last=False)  # the model as given: rounds as Captum does
    ref, ref_delta = _captum(captum_attr.IntegratedGradients, model, x, baselines=baseline, target=t, n_steps=5,
                             method=method, return_convergence_delta=True)
    assert_attr_close(attr, ref, what=f"{name} IG {method}")
    # the delta is a difference of O(|f|) sums: compare it on the scale of those sums
    scale = attr.flatten(1).abs().sum(1) + ref_delta.abs()
    assert ((delta - ref_delta).abs() <= 1e-5 * scale).all(), (delta, ref_delta)


def test_smoothgrad_matches_noise_tunnel_at_fixed_noise(arch):
    """Same noise: each sample spans exactly [0, 1], so Smilkov's sigma = noise * (max - min) is
    Captum's absolute stdev, and Captum draws it from the global generator seeded alike."""
    name, model, x, t = arch
    torch.manual_seed(7)
    ref = _captum(captum_attr.NoiseTunnel, captum_attr.Saliency(model), x, nt_type="smoothgrad", nt_samples=3,
                  stdevs=0.15, target=t)
    ours = smoothgrad(model, x, t, n_samples=3, noise=0.15, generator=torch.Generator().manual_seed(7),
                      channels_last=False)
    assert_attr_close(ours, ref, what=f"{name} smoothgrad")


def test_deeplift_matches_captum(arch):
    name, model, x, t = arch
    peer = unique_relus(model) if name == "resnet18" else model
    for baseline in (0.0, torch.rand(1, *x.shape[1:]) * 0.5):
        attr, delta = deeplift(model, x, t, baseline=baseline, return_delta=True)
        ref, ref_delta = _captum(captum_attr.DeepLift, peer, x, baselines=baseline, target=t,
                                 return_convergence_delta=True)
        assert_attr_close(attr, ref, what=f"{name} deeplift")
        scale = attr.flatten(1).abs().sum(1)
        assert ((delta - ref_delta).abs() <= 1e-5 * scale).all(), (delta, ref_delta)


# --------------------------------------------------------------------------- golden values

def test_golden_linear_relu_model():
    """f(x) = sum_i w_i relu(x_i): every method has a closed form."""
    w = torch.tensor([2.0, -1.0, 0.5, 3.0]).view(1, 1, 2, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return (self.relu(x) * w).flatten(1).sum(1, keepdim=True)

    net = Net()
    x = torch.tensor([1.0, 2.0, -1.0, -0.5]).view(1, 1, 2, 2)
    on = (x > 0).float()
    torch.testing.assert_close(saliency(net, x, 0, abs=False), w * on)
    torch.testing.assert_close(saliency(net, x, 0), (w * on).abs())
    torch.testing.assert_close(guided_backprop(net, x, 0), w.clamp_min(0) * on)
    torch.testing.assert_close(deconvnet(net, x, 0), w.clamp_min(0))
    b = torch.tensor([-1.0, 1.0, 1.0, 0.5]).view(1, 1, 2, 2)
    # DeepLIFT rescale: w_i (relu(x_i) - relu(b_i)), exact for one nonlinearity
    torch.testing.assert_close(deeplift(net, x, 0, baseline=b), w * (x.relu() - b.relu()))
    # IG along the straight path: w_i * integral of 1[b + a(x - b) > 0] da * (x_i - b_i) = w_i (relu(x)-relu(b))
    # for these points (sign changes at most once); Gauss-Legendre with many steps converges to it
    ig = integrated_gradients(net, x, 0, baseline=b, steps=400, method="gausslegendre")
    torch.testing.assert_close(ig, w * (x.relu() - b.relu()), atol=2e-2, rtol=0)
    torch.testing.assert_close(to_map(torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]]), "max_abs"), torch.tensor([[[3.0]]]))
    torch.testing.assert_close(to_map(torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]]), "sum"), torch.tensor([[[0.0]]]))
    torch.testing.assert_close(to_map(torch.tensor([[[[1.0]], [[-2.0]], [[2.0]]]]), "l2"), torch.tensor([[[3.0]]]))


def test_integrated_gradients_step_weights_are_captums():
    """A linear model makes IG = w (x - b) * sum(step sizes): 1 for Gauss-Legendre, 1 - 1/n for
    Captum's trapezoid (step 1/n, end steps halved)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, b = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    exact = net[1].weight[2].view(1, 3, 2, 2) * (x - b)
    torch.testing.assert_close(integrated_gradients(net, x, 2, baseline=b, steps=7, method="gausslegendre"), exact)
    torch.testing.assert_close(integrated_gradients(net, x, 2, baseline=b, steps=7), exact * (1 - 1 / 7))


# --------------------------------------------------------------------------- axioms

def test_ig_completeness_within_reported_delta():
    net = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        gap = net(x)[:, 3] - net(torch.zeros_like(x))[:, 3]
    for method, steps, tol in (("gausslegendre", 64, 1e-2), ("riemann_trapezoid", 256, 1e-2)):
        attr, delta = integrated_gradients(net, x, 3, steps=steps, method=method, return_delta=True)
        completeness = attr.flatten(1).sum(1) - gap
        torch.testing.assert_close(completeness, delta, atol=1e-6, rtol=0)
        # small against the attributions' total mass (the net's score gap itself is tiny)
        assert (delta.abs() <= tol * attr.flatten(1).abs().sum(1)).all(), (method, delta, gap)
    coarse = integrated_gradients(net, x, 3, steps=4, method="riemann_trapezoid", return_delta=True)[1]
    fine = integrated_gradients(net, x, 3, steps=64, method="riemann_trapezoid", return_delta=True)[1]
    assert (fine.abs() < coarse.abs()).all()


@pytest.mark.parametrize("pool", [True, False], ids=["maxpool", "avgpool"])
def test_deeplift_summation_to_delta(pool):
    """Rescale rule + linear layers conserve exactly; Captum's max-pool treatment conserves for
    a zero baseline after a conv (the reference is constant per channel)."""
    net = tiny_net(pool=pool)
    x = torch.rand(3, 3, 16, 16)
    baselines = [0.0] if pool else [0.0, torch.rand(3, 3, 16, 16)]
    for baseline in baselines:
        base = baseline if torch.is_tensor(baseline) else torch.zeros_like(x)
        attr, delta = deeplift(net, x, 2, baseline=baseline, return_delta=True)
        with torch.no_grad():
            gap = net(x)[:, 2] - net(base)[:, 2]
        torch.testing.assert_close(attr.flatten(1).sum(1) - gap, delta, atol=1e-5, rtol=0)
        assert (delta.abs() <= 1e-5 * (1 + gap.abs())).all(), (delta, gap)


def test_implementation_invariance_saliency_and_ig():
    """One conv vs the same conv split into two parallel convs that are summed: the same
    function, so the same saliency and IG."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            with torch.no_grad():
                share = torch.rand_like(conv.weight)
                self.a.weight.copy_(conv.weight * share)
                self.b.weight.copy_(conv.weight * (1 - share))
                self.a.bias.copy_(conv.bias)
                self.b.bias.zero_()
            self.head = head

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    one, two = nn.Sequential(conv, head).eval(), Split().eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(one(x), two(x), rtol=1e-5, atol=1e-6)
    assert_attr_close(saliency(two, x, 1), saliency(one, x, 1), rtol=1e-4)
    assert_attr_close(integrated_gradients(two, x, 1, steps=8), integrated_gradients(one, x, 1, steps=8), rtol=1e-4)


# --------------------------------------------------------------------------- batching, targets, state

def _methods():
    return {
        "saliency": saliency,
        "guided_backprop": guided_backprop,
        "deconvnet": deconvnet,
        "ig": functools.partial(integrated_gradients, steps=3),
        "deeplift": functools.partial(deeplift, baseline=0.1),
        "smoothgrad": lambda m, x, t: smoothgrad(m, x, t, n_samples=2, generator=torch.Generator().manual_seed(0)),
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_k_targets_stack_single_targets(name):
    fn = _methods()[name]
    net = tiny_net()
    x = torch.rand(2, 3, 12, 12)
    stacked, singles = k_target_columns(lambda x, t: fn(net, x, t), x, torch.tensor([[0, 3, 4], [2, 2, 1]]))
    for j, single in enumerate(singles):
        assert_attr_close(stacked[:, j], single, rtol=1e-6, what=f"{name} target column {j}")
    callable_target = fn(net, x, lambda out: out[:, 3] - out[:, 0])
    assert callable_target.shape == x.shape and torch.isfinite(callable_target).all()


def _state(model):
    return (model.training, [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks), "forward" in m.__dict__)
             for n, m in model.named_modules()])


@pytest.mark.parametrize("name", list(_methods()))
def test_model_left_as_found_also_on_error(name):
    fn = _methods()[name]
    net = tiny_net()
    net[0].weight.requires_grad_(False)
    before = _state(net)
    x = torch.rand(2, 3, 12, 12)
    out = fn(net, x, 1)
    assert out.shape == x.shape and out.device == x.device and out.dtype == x.dtype
    assert _state(net) == before and x.grad is None
    with pytest.raises(ValueError, match="target: class 9 is out of range"):
        fn(net, x, 9)
    assert _state(net) == before


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "deeplift", "saliency"])
def test_inplace_relu_same_as_out_of_place(name):
    fn = _methods()[name]
    x = torch.rand(2, 3, 12, 12)
    assert_attr_close(fn(tiny_net(inplace=True), x, 2), fn(tiny_net(inplace=False), x, 2), rtol=1e-6)


def test_smoothgrad_reproducible_chunked_and_noise_free():
    """The noise is one draw, so chunking (by rows or by a memory budget) does not change it."""
    net = tiny_net()
    x = torch.rand(2, 3, 9, 7)
    whole = smoothgrad(net, x, 1, n_samples=5, generator=torch.Generator().manual_seed(3), batch_size=10)
    for chunking in (dict(batch_size=3), dict(memory_budget=1 << 16), dict()):
        chunked = smoothgrad(net, x, 1, n_samples=5, generator=torch.Generator().manual_seed(3), **chunking)
        assert_attr_close(chunked, whole, rtol=1e-5, what=f"smoothgrad {chunking}")
    other = smoothgrad(net, x, 1, n_samples=5, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other, whole)
    assert_attr_close(smoothgrad(net, x, 1, n_samples=3, noise=0.0), saliency(net, x, 1), rtol=1e-6)
    guided = smoothgrad(net, x, 1, n_samples=2, noise=0.0, method=guided_backprop)
    assert_attr_close(guided, guided_backprop(net, x, 1), rtol=1e-6)


def test_ig_batch_size_chunks_agree():
    net = tiny_net()
    x = torch.rand(3, 3, 8, 8)
    whole = integrated_gradients(net, x, [0, 1, 2], steps=6, batch_size=18)
    for chunking in (dict(batch_size=4), dict(memory_budget=1 << 16), dict()):
        assert_attr_close(integrated_gradients(net, x, [0, 1, 2], steps=6, **chunking), whole, rtol=1e-5,
                          what=f"IG {chunking}")


def test_memory_budget_sets_rows_per_pass():
    """The first pass is one row, measured (what autograd saves for it) and remembered for the
    model; the budget then sets the rows of every later pass, in proportion."""
    from cnnviz_fast.explain.gradients import _row_chunks
    net = tiny_net()

    def sizes(budget, batch_size=None, work="test"):
        out = []
        for start, stop in _row_chunks(net, torch.rand(1, 3, 16, 16), 100, batch_size, budget, work):
            out.append(stop - start)
            with torch.enable_grad():
                net(torch.rand(stop - start, 3, 16, 16, requires_grad=True)).sum().backward()
        return out

    small = sizes(1 << 20)  # this net saves ~25 KB per 16x16 row
    assert small[0] == 1 and sum(small) == 100 and 5 < small[1] < 99, small
    double = sizes(1 << 21)  # remembered: no one-row pass
    assert sum(double) == 100 and abs(double[0] - 2 * small[1]) <= 1, (small, double)
    assert sizes(1 << 21, work="other")[0] == 1  # other work is measured anew
    assert sizes(1) == [1] * 100
    assert sizes(1 << 40) == [100]
    assert sizes(None, batch_size=30) == [30, 30, 30, 10]


def test_deeplift_reused_relu_module_matches_unique_copy():
    from cnnviz_fast.models import resnet18
    torch.manual_seed(0)
    model = resnet18(num_classes=4).eval()
    x = torch.rand(1, 3, 32, 32)
    assert_attr_close(deeplift(model, x, 1), deeplift(unique_relus(model), x, 1), rtol=1e-6)


# --------------------------------------------------------------------------- bad input

def test_bad_input_is_named():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        integrated_gradients(net, x, 0, steps=0)
    with pytest.raises(ValueError, match="steps: riemann_trapezoid needs steps >= 2"):
        integrated_gradients(net, x, 0, steps=1)
    with pytest.raises(ValueError, match="method: expected 'riemann_trapezoid' or 'gausslegendre'"):
        integrated_gradients(net, x, 0, method="riemann_left")
    for fn in (integrated_gradients, deeplift):
        with pytest.raises(ValueError, match=r"baseline: expected a number or a tensor of shape \(2, 3, 8, 8\)"):
            fn(net, x, 0, baseline=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="n_samples: expected an int >= 1"):
        smoothgrad(net, x, 0, n_samples=0)
    with pytest.raises(ValueError, match="noise: expected a finite number >= 0"):
        smoothgrad(net, x, 0, noise=-0.1)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        smoothgrad(net, x, 0, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget: expected a finite number >= 1"):
        integrated_gradients(net, x, 0, memory_budget=0)
    with pytest.raises(ValueError, match="reduce: expected 'max_abs', 'sum' or 'l2', got 'mean'"):
        to_map(torch.zeros(1, 3, 2, 2), reduce="mean")
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        saliency(net, torch.rand(3, 8, 8), 0)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        saliency(net, torch.ones(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"target: expected an int, 2 ints or a \[2, k\] tensor"):
        integrated_gradients(net, x, [0, 1, 2])
    with pytest.raises(ValueError, match="deeplift: layer '1' \\(Softmax\\)"):
        deeplift(nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), x, 0)
