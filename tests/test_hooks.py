"""Model plumbing: layer lookup, capture with in-place ReLUs, layer gradients, targets."""
import pytest
import torch
from torch import nn

from cnnviz_fast import resolve_layer
from cnnviz_fast._hooks import capture, layer_gradients
from cnnviz_fast._targets import target_scores


def tiny_net(inplace=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()


def test_resolve_layer_by_name_and_module():
    net = tiny_net()
    assert resolve_layer(net, "2") is net[2]
    assert resolve_layer(net, net[4]) is net[4]


def test_unknown_layer_lists_close_names():
    net = nn.Sequential()
    net.add_module("layer4", nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match=r"no module named 'layer4.1'.*closest: .*layer4"):
        resolve_layer(net, "layer4.1")
    with pytest.raises(ValueError, match="not part of the model"):
        resolve_layer(net, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="layer: expected a module or a dotted name"):
        resolve_layer(net, 3)


def test_capture_is_true_output_under_inplace_relu_and_hooks_removed():
    net = tiny_net(inplace=True)
    x = torch.randn(2, 3, 8, 8)
    with capture(net, "2") as rec:
        out = net(x)
    expected = net[2](net[1](net[0](x).clone()))  # pre-ReLU output of conv 2
    assert (expected < 0).any(), "the check needs negative pre-ReLU values"
    torch.testing.assert_close(rec["2"], expected)
    torch.testing.assert_close(out, tiny_net(inplace=False)(x))
    assert all(not m._forward_hooks for m in net.modules())


def test_hooks_removed_when_forward_raises():
    net = tiny_net()
    with pytest.raises(RuntimeError):
        with capture(net, "0"):
            net(torch.randn(1, 2, 8, 8))  # wrong channel count
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("inplace", [True, False])
def test_layer_gradients_equal_autograd_and_leave_model_untouched(inplace):
    net = tiny_net(inplace)
    x = torch.randn(3, 3, 8, 8)
    acts, grads, out = layer_gradients(net, x, "2", [0, 2, 1])
    # Independent computation: split the net by hand.
    a = net[2](net[1](net[0](x).clone())).detach().requires_grad_()
    head = nn.Sequential(*list(tiny_net(False).children())[3:])
    head.load_state_dict({k: v for k, v in nn.Sequential(*list(net.children())[3:]).state_dict().items()})
    scores = head(a.clone()).gather(1, torch.tensor([[0], [2], [1]]))
    (expected,) = torch.autograd.grad(scores.sum(), a)
    torch.testing.assert_close(acts, a.detach())
    torch.testing.assert_close(grads, expected)
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


def test_several_targets_per_sample_gain_a_k_axis():
    net = tiny_net()
    x = torch.randn(2, 3, 6, 6)
    _, grads, _ = layer_gradients(net, x, "2", torch.tensor([[0, 1], [2, 0]]))
    assert grads.shape == (2, 2, 5, 6, 6)
    for j, t in enumerate(([0, 2], [1, 0])):
        _, g, _ = layer_gradients(net, x, "2", t)
        torch.testing.assert_close(grads[:, j], g)


def test_callable_target():
    net = tiny_net()
    x = torch.randn(2, 3, 6, 6)
    _, g_callable, _ = layer_gradients(net, x, "2", lambda out: out[:, 1] - out[:, 0])
    _, g1, _ = layer_gradients(net, x, "2", 1)
    _, g0, _ = layer_gradients(net, x, "2", 0)
    torch.testing.assert_close(g_callable, g1 - g0)


@pytest.mark.parametrize("target, match", [
    (3, "class 3 is out of range for a model with 3 outputs"),
    (-1, "class -1 is out of range"),
    ([0, 1, 2], r"expected an int, 2 ints or a \[2, k\] tensor"),
    (torch.tensor([0.5, 1.0]), "expected integer class indices"),
    (True, "got a bool"),
    (lambda out: out, r"one score per sample, shape \(2,\)"),
])
def test_bad_targets_are_named(target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        target_scores(torch.randn(2, 3), target)
