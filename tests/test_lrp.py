"""lrp: agreement with zennit's composites and canonizers, relevance conservation, a hand-worked
golden case, [B, k] targets, in-place ReLUs, the model left as found, and bad input."""
import pytest
import torch
from torch import nn

from cnnviz_fast import lrp
from cnnviz_fast.explain.lrp import Epsilon, Flat, Gamma, Pass, ZBox, ZPlus
from tests._peers import import_zennit
from tests.helpers import k_target_columns

zennit = import_zennit()
needs_zennit = pytest.mark.skipif(zennit is None, reason="zennit is not installed")

# ImageNet-normalised pixels in [0, 1]: the z^B box, per channel.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD


def _randomize_batch_norms(model):
    """Non-trivial running statistics, so that folding them is tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _small_vgg_bn(inplace=True):
    return _randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace), nn.AdaptiveAvgPool2d(3),
        nn.Flatten(), nn.Linear(108, 20), nn.ReLU(inplace), nn.Dropout(), nn.Linear(20, 5)))


def _zennit_relevance(model, x, target, composite):
    """zennit's attribution with the output relevance lrp uses: the target logit, one-hot."""
    with composite.context(model) as modified:
        xi = x.clone().requires_grad_(True)
        out = modified(xi)
        seed = torch.zeros_like(out)
        rows = torch.arange(len(x))
        seed[rows, target] = out[rows, target].detach()
        (relevance,) = torch.autograd.grad(out, xi, seed)
    return relevance


def _assert_matches(got, expected, what, rtol=1e-5):
    """Max error <= rtol of the relevance scale (the largest |relevance|)."""
    assert got.shape == expected.shape, what
    scale = expected.abs().max()
    err = (got - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err.item():.3g} of the relevance scale {scale.item():.3g}"


def _composite(name, model_name, low=LOW, high=HIGH):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox,
                                   EpsilonPlus, EpsilonPlusFlat)
    from zennit.torchvision import ResNetCanonizer
    canonizers = [ResNetCanonizer() if model_name.startswith("resnet") else SequentialMergeBatchNorm()]
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    return {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_plus": EpsilonPlus,
            "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
            "epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat}[name](canonizers=canonizers)


@pytest.fixture(scope="module")
def zoo():
    """The model zoo with random weights and random batch-norm statistics, and the embedded
    default model as shipped (built once): name -> (model, input batch 2, low, high); the
    smallest sizes the ImageNet models take (their last maps are 1x1), shapes_cnn's 64 px."""
    from cnnviz_fast import models
    from cnnviz_fast.data import shapes
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    built = {name: (_randomize_batch_norms(getattr(models, name)()), (torch.rand(2, 3, size, size, generator=g) - MEAN) / STD,
                    LOW, HIGH) for name, size in (("alexnet", 64), ("vgg16_bn", 32), ("resnet18", 32))}
    built["shapes_cnn"] = (models.shapes_cnn(pretrained=True), shapes(2, seed=1).images, 0.0, 1.0)
    return built


def _relevance(library, model, x, target, rules, low, high, model_name, dtype):
    """Our or zennit's relevance in ``dtype``; the model is converted and converted back (exact).
    Ours on the model as given (``channels_last=False``), so both round alike."""
    low, high = (torch.as_tensor(b, dtype=dtype) for b in (low, high))
    model.to(dtype)
    try:
        x = x.to(dtype)
        if library == "ours":
            return lrp(model, x, target, rules, low=low, high=high, channels_last=False)
        return _zennit_relevance(model, x, target, _composite(rules, model_name, low, high))
    finally:
        model.float()


@needs_zennit
@pytest.mark.parametrize("rules", ["epsilon_plus_flat", "epsilon_gamma_box"])
@pytest.mark.parametrize("model_name", ["alexnet", pytest.param("vgg16_bn", marks=pytest.mark.slow), "resnet18",
                                        "shapes_cnn"])
def test_matches_zennit_on_the_zoo(zoo, model_name, rules):
    """Same algorithm: float64 results agree to 1e-9 of the relevance scale. float32: within
    1e-5 of the scale, or (flash-attention's rule) no further from the float64 result than twice
    zennit's own float32 error: with random weights the epsilon rule divides by near-zero
    pre-activations and both libraries then lose ~1e-2 relative in float32 (vgg16_bn)."""
    model, x, low, high = zoo[model_name]
    target = torch.tensor([1, 4])
    args = (model, x, target, rules, low, high, model_name)
    zennit64 = _relevance("zennit", *args, torch.float64)
    _assert_matches(_relevance("ours", *args, torch.float64), zennit64, f"{model_name} {rules} float64", 1e-9)
    ours32 = _relevance("ours", *args, torch.float32).double()
    scale = zennit64.abs().max()
    if (ours32 - zennit64).abs().max() > 1e-5 * scale:  # ill-conditioned: measure zennit's own error
        zennit32 = _relevance("zennit", *args, torch.float32).double()
        zennit_error = ((zennit32 - zennit64).abs().max() / scale).item()
        _assert_matches(ours32, zennit64, f"{model_name} {rules} float32", 2 * zennit_error)


@needs_zennit
@pytest.mark.parametrize("rules", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat"])
def test_other_rule_sets_match_zennit(rules):
    model = _small_vgg_bn()
    x = torch.randn(2, 3, 12, 10)  # mixed signs into the first layer: both sign parts are used
    target = torch.tensor([0, 3])
    _assert_matches(lrp(model, x, target, rules), _zennit_relevance(model, x, target, _composite(rules, "vgg")),
                    rules)


@needs_zennit
def test_custom_rule_map_matches_zennit():
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import NameLayerMapComposite
    from zennit import rules as zr, types as zt
    model = _small_vgg_bn()
    x = torch.rand(2, 3, 8, 8)
    composite = NameLayerMapComposite(
        name_map=[(("0",), zr.ZBox(low=0.0, high=1.0)), (("12",), zr.Epsilon(epsilon=0.1))],
        layer_map=[(zt.Activation, zr.Pass()), (zt.BatchNorm, zr.Pass()), (zt.AvgPool, zr.Norm()),
                   (nn.Conv2d, zr.Gamma(gamma=0.5)), (nn.Linear, zr.ZPlus())],
        canonizers=[SequentialMergeBatchNorm()])
    rules = {"0": ZBox(0.0, 1.0), "12": Epsilon(0.1), nn.Conv2d: Gamma(0.5), nn.Linear: ZPlus()}
    _assert_matches(lrp(model, x, 2, rules), _zennit_relevance(model, x, torch.tensor([2, 2]), composite),
                    "custom rules")


def test_golden_lrp_zero_by_hand():
    # h = relu(W x) = [3, 2], out = 5; LRP-0: R_h = h, R_x = x * W^T (R_h / h) = [1 + 3, 2 - 1].
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    model[0].weight.data = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    model[2].weight.data = torch.tensor([[1.0, 1.0]])
    got = lrp(model, torch.tensor([[1.0, 1.0]]), 0, {nn.Linear: Epsilon(0.0)})
    assert torch.equal(got, torch.tensor([[4.0, 1.0]]))


def test_relevance_conservation_epsilon_bias_free():
    """LRP-epsilon with a small epsilon conserves relevance: the input relevance sums to the
    target logit in a bias-free ReLU net (biases absorb their share of it otherwise)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4, bias=False)).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    relevance = lrp(model, x, target, {nn.Conv2d: Epsilon(1e-12), nn.Linear: Epsilon(1e-12)}, stabilizer=1e-12)
    score = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), score, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_relevance_conservation_through_canonized_resnet_blocks(block):
    """Folded batch norms without shift and the residual sums under the Norm rule conserve
    relevance too: LRP-epsilon on a ResNet sums to the target logit. (Batch-norm eps 0: zennit's
    merged batch norm, which lrp copies, still divides by sqrt(1 + eps), scaling each branch.)"""
    from cnnviz_fast import models
    torch.manual_seed(4)
    model = models.ResNet(getattr(models, block), [1, 1, 1, 1], num_classes=4).double()
    _randomize_batch_norms(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # BN(x) = scale * x: the folded convolutions stay bias-free
            m.running_mean.zero_()
            m.bias.data.zero_()
            m.eps = 0.0
    model.fc.bias.data.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([2, 0])
    relevance = lrp(model, x, target, {nn.Conv2d: Epsilon(1e-12), nn.Linear: Epsilon(1e-12)}, stabilizer=1e-12)
    score = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), score, rtol=1e-9, atol=1e-12)


def test_k_targets_stack_single_target_maps():
    model = _small_vgg_bn()
    x = torch.randn(2, 3, 8, 8)
    got, singles = k_target_columns(lambda x, t: lrp(model, x, t), x, torch.tensor([[0, 4, 2], [1, 1, 3]]))
    for j, single in enumerate(singles):
        torch.testing.assert_close(got[:, j], single, rtol=0, atol=0)


def test_inplace_relus_match_out_of_place():
    inplace, plain = _small_vgg_bn(inplace=True), _small_vgg_bn(inplace=False)
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for rules in ("epsilon_plus_flat", "epsilon_gamma_box"):
        torch.testing.assert_close(lrp(inplace, x, 1, rules, low=-3.0, high=3.0),
                                   lrp(plain, x, 1, rules, low=-3.0, high=3.0), rtol=0, atol=0)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), "forward" in m.__dict__)
             for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


def _assert_unchanged(model, before):
    state, modules, params = _snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert modules == before[1]
    assert params == before[2]


@pytest.mark.filterwarnings("ignore:model. is in training mode")  # the point of this test
def test_model_left_exactly_as_found_also_on_errors():
    model = _small_vgg_bn().train()  # explained in eval mode, train mode restored
    model[4].weight.requires_grad_(False)
    before = _snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    relevance = lrp(model, x, 1)
    _assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="target"):
        lrp(model, x, 7)  # raises after the forward pass, with the rules in place
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"x: the model rejected shape \(2, 3, 1, 1\)") as info:
        lrp(model, torch.randn(2, 3, 1, 1), 1)  # raises inside the model's forward (pooling a 1x1 map)
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)
    torch.testing.assert_close(lrp(model, x, 1), relevance, rtol=0, atol=0)


def test_result_on_input_device_and_dtype():
    model = _small_vgg_bn().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = lrp(model, x, 0)
    assert got.dtype == torch.float64 and got.device == x.device and got.shape == x.shape


def test_flat_rule_spreads_evenly():
    # Flat: z = 4 (the receptive field's size), so each input gets a quarter of the output.
    conv = nn.Conv2d(1, 1, 2, bias=False)
    x = torch.rand(1, 1, 2, 2) + 0.5
    got = lrp(nn.Sequential(conv, nn.Flatten()), x, 0, {nn.Conv2d: Flat(0.0)})
    torch.testing.assert_close(got, (conv(x).reshape(1, 1, 1, 1) / 4).expand_as(got))


def test_bad_input():
    model = _small_vgg_bn()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown rule set 'epsilon_plus_flatt'.*epsilon_plus_flat"):
        lrp(model, x, 0, "epsilon_plus_flatt")
    with pytest.raises(ValueError, match=r"layer '4' \(Conv2d\) is not covered by the custom rule map"):
        lrp(model, x, 0, {"0": Flat(), nn.Linear: Epsilon()})
    lrn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LocalResponseNorm(2), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(LocalResponseNorm\) is not covered by 'epsilon_plus_flat'"):
        lrp(lrn, x, 0)
    lrp(lrn, x, 0, {nn.Conv2d: ZPlus(), nn.Linear: Epsilon(), "1": Pass()})  # covered once mapped
    with pytest.raises(ValueError, match="low, high"):
        lrp(model, x, 0, "epsilon_gamma_box")
    with pytest.raises(ValueError, match="low: shape"):
        lrp(model, x, 0, "epsilon_gamma_box", low=torch.zeros(5), high=1.0)
    with pytest.raises(TypeError, match="must be a Rule"):
        lrp(model, x, 0, {nn.Conv2d: "zplus"})
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        lrp(model, x, 0, {"conv9": ZPlus()})
    with pytest.raises(ValueError, match="ZPlus applies to convolution and linear layers"):
        lrp(model, x, 0, {nn.Conv2d: ZPlus(), nn.Linear: Epsilon(), nn.MaxPool2d: ZPlus()})
    with pytest.raises(ValueError, match="x: expected"):
        lrp(model, torch.randn(8), 0)
