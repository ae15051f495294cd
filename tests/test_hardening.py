"""Every public method under the same rules, as users meet them (issue 13): a train-mode model
is left bit-identical, NaN inputs raise, empty batches give empty results, batch size and
memory layout do not change the maps, float64 models work."""
import functools

import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn


class _Net(nn.Module):
    """The default model with dropout before its head: BatchNorm and Dropout both present."""

    def __init__(self):
        super().__init__()
        base = shapes_cnn()
        self.features, self.avgpool, self.fc = base.features, base.avgpool, base.fc
        self.drop = nn.Dropout(0.5)
        self.class_names = base.class_names

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.avgpool(self.features(x)), 1)))


@functools.lru_cache(maxsize=None)
def _images():
    return shapes(32, seed=1).images


def _net():
    return _Net().eval()


def _top_k(model, x, _target):
    result = cf.top_k_patches(model, x, "features", k=3, channels=[0, 5, 9], batch_size=8, progress=False)
    return result["features"].values


# name -> (call(model, x, target) -> tensor, name of the input in errors)
METHODS = {
    "saliency": (cf.saliency, "x"),
    "guided_backprop": (cf.guided_backprop, "x"),
    "deconvnet": (cf.deconvnet, "x"),
    # (seeded: a noisy copy landing on a ReLU or max-pool kink can flip its gradient under
    # the rounding of another batch shape; with these seeds none does at float32 tolerance)
    "smoothgrad": (lambda m, x, t: cf.smoothgrad(m, x, t, n_samples=3,
                                                generator=torch.Generator().manual_seed(0)), "x"),
    "integrated_gradients": (lambda m, x, t: cf.integrated_gradients(m, x, t, steps=2), "x"),
    "deeplift": (cf.deeplift, "x"),
    "lrp": (cf.lrp, "x"),
    "cam": (cf.cam, "x"),
    "grad_cam": (lambda m, x, t: cf.grad_cam(m, x, t, "features"), "x"),
    "grad_cam_pp": (lambda m, x, t: cf.grad_cam_pp(m, x, t, "features.12"), "x"),
    "layer_cam": (lambda m, x, t: cf.layer_cam(m, x, t, "features"), "x"),
    "score_cam": (lambda m, x, t: cf.score_cam(m, x, t, "features.2"), "x"),
    "occlusion": (lambda m, x, t: cf.occlusion(m, x, t, window=32, stride=32), "x"),
    "occlusion_incremental": (lambda m, x, t: cf.occlusion(m, x, t, window=32, stride=32, mode="incremental"),
                              "x"),
    "layer_activations": (lambda m, x, _t: cf.layer_activations(m, x, "features"), "x"),
    "embed": (lambda m, x, _t: cf.embed(m, x, "avgpool", batch_size=8, progress=False).vectors, "data"),
    "top_k_patches": (_top_k, "images"),
}
# Incremental occlusion builds one engine per image, so batching cannot change its maps, and it
# equals the exact sweep (tests/test_incremental.py): left out of the two costliest sweeps.
# top_k_patches ranks the whole dataset, so a batch of 1 and one of 7 give different answers.
FLOAT64 = [n for n in METHODS if n != "occlusion_incremental"]
BATCHED = [n for n in FLOAT64 if n != "top_k_patches"]


def _run(name, model, x, target=None):
    fn = METHODS[name][0]
    return fn(model, x, target if target is not None else torch.arange(len(x)) % 6)


def _assert_close(actual, expected, what, rtol=1e-4):
    """float32 tolerance relative to the result's scale (sums over different batch shapes
    round differently)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale + 1e-7,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", METHODS)
def test_train_mode_model_is_left_bit_identical(name):
    model = _net().train()
    model.features[4].eval()  # a mixed-mode model: each module's own mode comes back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = _images()[:4]
    with pytest.warns(UserWarning, match="training mode; cnnviz_fast explains it in eval mode"):
        result = _run(name, model, x)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "a parameter or buffer changed"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks
    # the documented behaviour: the explanation of the model in eval mode
    _assert_close(result, _run(name, _net(), x), name, rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_nan_input_raises_naming_it(name):
    x = _images()[:3].clone()
    x[1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=rf"^{METHODS[name][1]}: has non-finite values .* index \(1, 2, 5, 7\)"):
        _run(name, _net(), x)


@pytest.mark.parametrize("name", METHODS)
def test_empty_batch_gives_empty_results(name):
    model, x = _net(), _images()[:2]
    full = _run(name, model, x)
    empty = _run(name, model, x[:0], torch.zeros(0, dtype=torch.long))
    expected = full.shape if name == "top_k_patches" else (0, *full.shape[1:])
    assert empty.shape == expected and empty.dtype == full.dtype


@pytest.mark.parametrize("name", BATCHED)
def test_batch_size_does_not_change_the_maps(name):
    model, x = _net(), _images()
    results = {b: _run(name, model, x[:b]) for b in (1, 7, 32)}
    _assert_close(results[7][:1], results[1], f"{name}: batch 7 vs 1")
    _assert_close(results[32][:7], results[7], f"{name}: batch 32 vs 7")


@pytest.mark.parametrize("name", FLOAT64)
def test_float64_model_and_input(name):
    x = _images()[:3]
    single = _run(name, _net(), x)
    double = _run(name, _net().double(), x.double())
    # embed's vectors are float32 by contract (what FAISS indexes)
    assert double.dtype == (torch.float32 if name == "embed" else torch.float64)
    assert double.shape == single.shape and bool(torch.isfinite(double).all())
    if name != "smoothgrad":  # float64 noise is other noise
        _assert_close(double.float(), single, f"{name}: float64 vs float32", rtol=2e-3)


@pytest.mark.parametrize("name", METHODS)
def test_channels_last_and_non_contiguous_inputs_give_the_same_maps(name):
    model, x = _net(), _images()[:3]
    expected = _run(name, model, x)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous() and not channels_last.is_contiguous()
    # oneDNN runs other convolution kernels on channels-last tensors, rounding differently;
    # Grad-CAM++'s g^3 terms amplify that to ~2e-4 of the map's range
    _assert_close(_run(name, model, channels_last), expected, f"{name}: channels-last", rtol=1e-3)
    _assert_close(_run(name, model, strided), expected, f"{name}: non-contiguous", rtol=1e-3)
