"""compute_dtype and channels_last across the gradient and CAM families (cnnviz_fast._precision):
float32 unchanged, bfloat16 close to float32 on the trained default model, channels-last with
folded batch norms equal to the model as given, the user's model untouched, bad values named."""
import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast import _precision
from cnnviz_fast._precision import fidelity
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn

LAYER = "features.15"


def _seeded():
    return torch.Generator().manual_seed(0)


# name -> map [B, H, W] from (model, x, target, **precision); IG and SmoothGrad with a fixed
# batch_size so that every call chunks alike
METHODS = {
    "saliency": lambda m, x, t, **k: cf.to_map(cf.saliency(m, x, t, **k)),
    "guided_backprop": lambda m, x, t, **k: cf.to_map(cf.guided_backprop(m, x, t, **k)),
    "deconvnet": lambda m, x, t, **k: cf.to_map(cf.deconvnet(m, x, t, **k)),
    "smoothgrad": lambda m, x, t, **k: cf.to_map(cf.smoothgrad(m, x, t, n_samples=6, generator=_seeded(),
                                                               batch_size=12, **k)),
    "integrated_gradients": lambda m, x, t, **k: cf.to_map(cf.integrated_gradients(m, x, t, steps=8,
                                                                                   batch_size=16, **k)),
    "deeplift": lambda m, x, t, **k: cf.to_map(cf.deeplift(m, x, t, **k)),
    "grad_cam": lambda m, x, t, **k: cf.grad_cam(m, x, t, LAYER, **k),
    "grad_cam_pp": lambda m, x, t, **k: cf.grad_cam_pp(m, x, t, LAYER, **k),
    "layer_cam": lambda m, x, t, **k: cf.layer_cam(m, x, t, LAYER, **k),
    "score_cam": lambda m, x, t, **k: cf.score_cam(m, x, t, LAYER, **k),
    "cam": lambda m, x, t, **k: cf.cam(m, x, t, **k),
}


@pytest.fixture(scope="module")
def trained():
    data = shapes(6, size=48, seed=3)
    return shapes_cnn().eval(), data.images, data.labels


@pytest.fixture(scope="module")
def float32_maps(trained):
    model, x, t = trained
    return {name: fn(model, x, t) for name, fn in METHODS.items()}


@pytest.mark.parametrize("name", METHODS)
def test_float32_compute_dtype_is_the_default_path(name, trained, float32_maps):
    model, x, t = trained
    assert torch.equal(METHODS[name](model, x, t, compute_dtype=torch.float32), float32_maps[name])


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_maps_rank_like_float32_on_the_trained_model(name, trained, float32_maps):
    model, x, t = trained
    low = METHODS[name](model, x, t, compute_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == float32_maps[name].shape
    spearman, iou = fidelity(low, float32_maps[name])
    # the claim (benchmarks/bench_gradients.py, bench_cam.py): mean per-map Spearman >= 0.95;
    # plain gradients (saliency) have single maps just under it
    assert spearman.mean() >= 0.95 and spearman.min() >= 0.9, (name, spearman)
    assert iou.mean() >= 0.7, (name, iou)
    assert not torch.equal(low, float32_maps[name])  # the body really ran in bfloat16


@pytest.mark.parametrize("name", METHODS)
def test_channels_last_equals_channels_first(name, trained, float32_maps):
    model, x, t = trained
    ref = METHODS[name](model, x, t, channels_last=False)
    got = METHODS[name](model, x, t, channels_last=True)
    assert torch.equal(float32_maps[name], got)  # channels-last, batch norms folded by default on CPU
    # float32 rounding differs between the layouts' kernels; where it flips a ReLU's sign at a
    # kink (SmoothGrad's noisy copies find some) a gradient changes beyond rounding, so a few
    # pixels may stray: at most 0.2% of them (SmoothGrad: 2%, one flip early in the body
    # moves a region of one noisy copy), and no map's ranking moves
    off = (got - ref).abs() > 1e-4 * float(ref.abs().max())
    worst = torch.unravel_index(off.float().argmax(), off.shape)
    assert float(off.float().mean()) <= (2e-2 if name == "smoothgrad" else 2e-3), (name, float(off.float().mean()), [int(i) for i in worst],
                                               float(got[worst]), float(ref[worst]))
    assert fidelity(got, ref)[0].min() >= 0.999


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
             for m in model.modules()],
            [(p.dtype, p.requires_grad, p.is_contiguous(), p.grad) for p in model.parameters()])


@pytest.mark.parametrize("name", ["saliency", "smoothgrad", "deeplift", "grad_cam", "score_cam"])
def test_user_model_is_untouched(name, trained):
    model, x, t = trained
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        before = _snapshot(model)
        with pytest.warns(UserWarning, match="training mode"):
            METHODS[name](model, x[:2], t[:2], compute_dtype=torch.bfloat16, channels_last=True)
        after = _snapshot(model)
        assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
        assert before[1] == after[1]
        assert [(d, r, c) for d, r, c, _ in before[2]] == [(d, r, c) for d, r, c, _ in after[2]]
        assert all(g is None for *_, g in after[2])
    finally:
        model.eval()


@pytest.mark.parametrize("bad", [torch.int32, "float31", 16, torch.bool])
@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "grad_cam", "score_cam"])
def test_bad_compute_dtype_names_it(name, bad, trained):
    model, x, t = trained
    with pytest.raises(TypeError, match="compute_dtype: expected None or a floating torch.dtype"):
        METHODS[name](model, x[:1], t[:1], compute_dtype=bad)


def test_bad_channels_last_names_it(trained):
    model, x, t = trained
    with pytest.raises(TypeError, match="channels_last: expected None, True or False"):
        cf.saliency(model, x[:1], t[:1], channels_last="yes")


class _ViewNet(nn.Module):
    """Flattens with ``view``, which fails on a channels-last tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.fc(a.view(a.shape[0], -1))


def test_model_refusing_channels_last_runs_channels_first():
    torch.manual_seed(0)
    model = _ViewNet().eval()
    x = torch.rand(2, 3, 8, 8)
    ref = cf.saliency(model, x, 1)
    assert torch.allclose(cf.saliency(model, x, 1, channels_last=True), ref, rtol=1e-5, atol=1e-7)
    assert cf.grad_cam(model, x, 1, "conv", compute_dtype=torch.bfloat16).shape == (2, 8, 8)


def test_smoothgrad_converts_the_model_once(trained, monkeypatch):
    model, x, t = trained
    calls = []
    convert = _precision._convert
    monkeypatch.setattr(_precision, "_convert", lambda *a: calls.append(1) or convert(*a))
    cf.smoothgrad(model, x[:2], t[:2], n_samples=4, batch_size=2, compute_dtype=torch.bfloat16)
    assert len(calls) == 1


def test_fidelity_of_equal_and_reversed_maps():
    maps = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 10, 10)
    spearman, iou = fidelity(maps, maps)
    assert spearman.tolist() == [1.0, 1.0] and iou.tolist() == [1.0, 1.0]
    spearman, iou = fidelity(-maps, maps)
    assert spearman.tolist() == pytest.approx([-1.0, -1.0]) and iou.tolist() == [0.0, 0.0]


def test_layer_activations_in_bfloat16_and_channels_last(trained):
    model, x, _ = trained
    ref = cf.layer_activations(model, x, LAYER)
    cl = cf.layer_activations(model, x, LAYER, channels_last=True)
    low = cf.layer_activations(model, x, LAYER, compute_dtype=torch.bfloat16)
    assert cl.is_contiguous() and torch.allclose(cl, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert fidelity(low.flatten(0, 1), ref.flatten(0, 1))[0].mean() >= 0.99


def test_top_k_patches_in_bfloat16_converts_once_and_finds_the_same_images(trained, monkeypatch):
    model, x, _ = trained
    calls = []
    convert = _precision._convert
    monkeypatch.setattr(_precision, "_convert", lambda *a: calls.append(1) or convert(*a))
    ref = cf.top_k_patches(model, x, LAYER, k=2, batch_size=2)[LAYER]
    assert len(calls) == 1  # one (channels-last, folded) copy for the three batches
    low = cf.top_k_patches(model, x, LAYER, k=2, batch_size=2, compute_dtype=torch.bfloat16)[LAYER]
    assert len(calls) == 2  # and one bfloat16 copy
    # the best image of most channels survives bfloat16's rounding
    assert float((low.ids[:, 0] == ref.ids[:, 0]).float().mean()) >= 0.8


def test_embed_in_bfloat16_keeps_the_neighbours(trained):
    model, x, _ = trained
    ref = cf.embed(model, x, "avgpool", batch_size=4).vectors
    cl = cf.embed(model, x, "avgpool", batch_size=4, channels_last=True).vectors
    low = cf.embed(model, x, "avgpool", batch_size=4, compute_dtype=torch.bfloat16).vectors
    assert torch.allclose(cl, ref, rtol=1e-4, atol=1e-6) and low.dtype == torch.float32
    assert torch.equal(torch.cdist(low, low).argsort(1)[:, 1], torch.cdist(ref, ref).argsort(1)[:, 1])


@pytest.mark.parametrize("rules", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_lrp_in_bfloat16_and_channels_last(rules, trained):
    model, x, t = trained
    ref = cf.lrp(model, x, t, rules=rules)
    cl = cf.lrp(model, x, t, rules=rules, channels_last=True)
    low = cf.lrp(model, x, t, rules=rules, compute_dtype=torch.bfloat16)
    assert torch.allclose(cl, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert low.dtype == torch.float32
    assert fidelity(low.sum(1), ref.sum(1))[0].mean() >= 0.95


def test_occlusion_shares_the_compute_dtype_check(trained):
    model, x, t = trained
    with pytest.raises(TypeError, match="compute_dtype: expected None or a floating torch.dtype"):
        cf.occlusion(model, x[:1], t[:1], window=16, stride=16, mode="approximate", compute_dtype="int8")


class _ConvBnNet(nn.Module):
    """A conv whose output feeds a batch norm and a second, unshared conv + batch norm; not an
    nn.Sequential, so the pairs come from the fx trace."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_batch_norms_fold_into_their_convolutions_in_the_copy_only():
    torch.manual_seed(0)
    model = _ConvBnNet().eval()
    x = torch.randn(2, 3, 10, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs, counterpart = _precision.lowered(model, x)
    assert _precision._conv_bn_pairs(model) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert not torch.equal(counterpart(model.conv2).weight, model.conv2.weight)  # folded
    assert counterpart(model.conv2).bias is not None and model.conv2.bias is None
    with torch.no_grad():
        torch.testing.assert_close(runs(x), model(x), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "forward" not in model.bn1.__dict__  # the user's batch norms still normalize
    # reused while the model is unchanged, made again after an in-place parameter update
    assert _precision.lowered(model, x)[0] is runs
    with torch.no_grad():
        model.bn2.running_mean.add_(0.1)
    again, _ = _precision.lowered(model, x)
    assert again is not runs
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_layer_whose_output_is_read_keeps_its_batch_norm():
    torch.manual_seed(0)
    model = _ConvBnNet().eval()
    x = torch.randn(2, 3, 10, 10)
    got = cf.layer_activations(model, x, "conv2")
    want = cf.layer_activations(model, x, "conv2", channels_last=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _, counterpart = _precision.lowered(model, x, keep=(model.conv2,))
    assert counterpart(model.conv2).bias is None  # not folded
    assert counterpart(model.conv1).bias is not None  # folded


def test_user_hooks_keep_their_batch_norm_and_a_training_batch_norm_is_not_folded():
    model = _ConvBnNet().eval()
    x = torch.randn(2, 3, 10, 10)
    seen = []
    handle = model.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        runs, counterpart = _precision.lowered(model, x)
        assert counterpart(model.conv1).bias is model.conv1.bias or torch.equal(
            counterpart(model.conv1).bias, model.conv1.bias)
        assert counterpart(model.conv2).bias is not None
    finally:
        handle.remove()
    model.bn2.train()
    _, counterpart = _precision.lowered(model, x)
    assert counterpart(model.conv2).bias is None

