"""Synthesis on the embedded default model: the issue's checks at small sizes and few steps,
the agreement with Lucent, the model left unchanged, and bad input."""
import copy
import math

import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn
from cnnviz_fast.synthesis import total_variation
from cnnviz_fast.synthesis.gram_methods import gram_loss
from tests._peers import import_lucent
from tests._single_thread import single_thread  # noqa: F401  (module fixture)

FIRST, MIDDLE, LAST = "features.2", "features.8", "features.17"  # ReLU outputs at depths 1, 3, 6


@pytest.fixture(scope="module")
def model():
    return shapes_cnn()


@pytest.fixture(scope="module")
def held_out():
    return shapes(24, size=32, seed=5).images


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_filter_grid_first_layer_rgb(model):
    grid = cf.filter_grid(model, scale=4, padding=1)
    out = model.features[0].out_channels  # 16 filters of [3, 3, 3]: a 4 x 4 grid of 12 px tiles
    assert grid.shape == (3, 4 * 13 + 1, 4 * 13 + 1) and out == 16
    tile = grid[:, 1:13, 1:13]
    weight = model.features[0].weight[0].detach()
    want = (weight - weight.min()) / (weight.max() - weight.min())
    assert torch.allclose(tile, want.repeat_interleave(4, 1).repeat_interleave(4, 2), atol=1e-6)


def test_filter_grid_deeper_layer_is_grey_channels(model):
    conv = model.features[3]  # [32, 16, 3, 3]: one row per filter, one column per input channel
    grid = cf.filter_grid(model, "features.3", scale=2, padding=0)
    assert grid.shape == (3, 32 * 6, 16 * 6)
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    k = conv.weight[5, 7].detach()
    assert torch.allclose(grid[0, 30:36:2, 42:48:2], (k - k.min()) / (k.max() - k.min()), atol=1e-6)


def test_class_visualization_is_classified_as_its_class(model):
    before = _state(model)
    model.train()  # the call must switch to eval mode and restore training mode afterwards
    result = cf.class_visualization(model, list(range(6)), size=32, steps=32, transforms=None)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "buffers or weights changed"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert result.images.shape == (6, 3, 32, 32) and result.trace.shape == (32, 6)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    with torch.no_grad():
        prob = model(result.images).softmax(1)
    assert bool((prob.diagonal() >= 0.9).all()), prob.diagonal()
    assert bool((result.trace[-1] > result.trace[0]).all())


def test_class_visualization_standard_transforms_and_pixel_blur(model):
    fourier = cf.class_visualization(model, [4, 1], size=24, steps=4, seed=3)
    pixel = cf.class_visualization(model, 2, size=(20, 28), steps=4, parametrization="pixel", decorrelate=False,
                                   blur_every=2, l2=0.1, transforms=None)
    assert fourier.images.shape == (2, 3, 24, 24) and pixel.images.shape == (1, 3, 20, 28)
    assert torch.isfinite(fourier.trace).all() and torch.isfinite(pixel.trace).all()
    again = cf.class_visualization(model, [4, 1], size=24, steps=4, seed=3)
    assert torch.equal(fourier.images, again.images), "a seed must fix the run"


def _mean_activations(model, index, images):
    """``[N, C]``: the mean over positions of ``model.features[index]``'s output on ``images``."""
    record = {}
    handle = model.features[index].register_forward_hook(lambda _m, _i, o: record.__setitem__("a", o.detach().clone()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return record["a"].mean((2, 3))


def test_channel_visualization_raises_the_channel(model, held_out):
    channels = [0, 5, 11, 20]
    result = cf.feature_visualization(model, MIDDLE, channels, size=32, steps=64, lr=0.2, transforms=None,
                                      parametrization="pixel", decorrelate=False)
    base = _mean_activations(model, 8, held_out)[:, channels].mean(0)
    got = _mean_activations(model, 8, result.images)[torch.arange(4), channels]
    assert bool((got >= 10 * base).all()), (got, base)


def test_redirected_relu_reaches_channels_dead_at_the_start(model, held_out):
    # channels of features.17 whose (in-place) ReLU is off everywhere on the start image
    channels, kwargs = [0, 12, 19, 35], dict(size=32, lr=0.2, transforms=None, parametrization="pixel",
                                             decorrelate=False)
    plain = cf.feature_visualization(model, LAST, channels, steps=64, redirected_relu_steps=0, **kwargs)
    assert bool((plain.trace == 0).all()), "dead on the start image: no gradient, the image never moves"
    redirected = cf.feature_visualization(model, LAST, channels, steps=64, **kwargs)
    assert bool((redirected.trace[0] == 0).all())
    base = _mean_activations(model, 17, held_out)[:, channels].mean(0)
    got = _mean_activations(model, 17, redirected.images)[torch.arange(4), channels]
    assert bool((base > 0).all()) and bool((got >= 10 * base).all()), (got, base)
    # the same with out-of-place ReLUs: the in-place ones are redirected from their input's copy
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    short = cf.feature_visualization(model, LAST, channels, steps=4, **kwargs)
    assert torch.equal(cf.feature_visualization(out_of_place, LAST, channels, steps=4, **kwargs).images, short.images)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


def test_redirected_relu_changes_nothing_where_the_gradient_flows(model):
    for call in (lambda r: cf.class_visualization(model, [0, 3, 5], size=24, steps=4, redirected_relu_steps=r),
                 lambda r: cf.feature_visualization(model, MIDDLE, [0, 5], size=24, steps=4, redirected_relu_steps=r)):
        assert torch.equal(call(0).images, call(16).images)


def test_neuron_and_direction_objectives(model):
    # the last block's batch norm, before its ReLU: every unit has a gradient from the start
    layer = "features.16"
    neuron = cf.feature_visualization(model, layer, [3, 7], position="center", size=24, steps=6, transforms=None)
    corner = cf.feature_visualization(model, layer, 3, position=(0, 0), size=24, steps=6, transforms=None)
    direction = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    along = cf.feature_visualization(model, layer, direction=direction, size=24, steps=6, transforms=None)
    for r, n in ((neuron, 2), (corner, 1), (along, 2)):
        assert r.images.shape == (n, 3, 24, 24) and r.trace.shape == (6, n)
        assert bool((r.trace[-1] > r.trace[0]).all())
    assert bool((along.trace.abs() <= 1 + 1e-6).all()), "cosine similarities lie in [-1, 1]"


def _image_error(model, x, layer, tv_weight, steps=60):
    result = cf.feature_inversion(model, x, layer, tv_weight=tv_weight, steps=steps, lr=0.1)
    return ((result.images - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean(), result


def test_inversion_error_grows_with_depth_and_tv_smooths(model, held_out):
    x = held_out[:2]
    errors = [_image_error(model, x, layer, 0.0)[0] for layer in (FIRST, MIDDLE, LAST)]
    assert errors[0] < errors[1] < errors[2], errors
    _, plain = _image_error(model, x, MIDDLE, 0.0, steps=30)
    _, smooth = _image_error(model, x, MIDDLE, 1.0, steps=30)
    assert bool((total_variation(smooth.images) < total_variation(plain.images)).all())
    assert plain.trace.shape == (30, 2) and bool((plain.trace[-1] < plain.trace[0]).all())


def test_texture_gram_loss_falls_100x(model, held_out):
    result = cf.texture_synthesis(model, held_out[:2], [FIRST, MIDDLE], steps=80, lr=0.1)
    assert result.images.shape == (2, 3, 32, 32)
    assert bool((result.trace[-1] * 100 <= result.trace[0]).all()), result.trace[[0, -1]]


def test_style_transfer_lowers_style_loss_and_keeps_content(model, held_out):
    content, style = held_out[:2], held_out[2:3]
    result = cf.style_transfer(model, content, style, content_layer=LAST, style_layers=[FIRST, MIDDLE],
                               steps=60, lr=0.1)
    assert result.trace.shape == (60, 2, 2)
    start_style, end_style = result.trace[0, :, 1], result.trace[-1, :, 1]
    assert bool((end_style * 10 <= start_style).all()), (start_style, end_style)
    # both losses measured again on the results and on random images
    from cnnviz_fast.synthesis.inversion import layer_features
    noise = torch.rand_like(content)
    targets = {k: cf.gram(v) for k, v in layer_features(model, style, [FIRST, MIDDLE]).items()}
    content_target = layer_features(model, content, LAST)[LAST]

    def losses(images):
        feats = layer_features(model, images, [FIRST, MIDDLE, LAST])
        return (feats[LAST] - content_target).flatten(1).pow(2).mean(1), gram_loss(feats, targets)

    (content_result, style_result), (content_noise, _) = losses(result.images), losses(noise)
    assert bool((content_result < content_noise).all()), (content_result, content_noise)
    assert torch.allclose(style_result, end_style, rtol=0.5)


@pytest.mark.parametrize("fft, decorrelate", [(True, True), (False, False)])
def test_lucent_agreement_first_steps(model, fft, decorrelate):
    peers = import_lucent()
    if peers is None:
        pytest.skip("torch-lucent is not importable (test extra; it also imports decorator and IPython)")
    render, param, objectives = peers
    classes = [0, 3, 5]
    torch.manual_seed(7)
    objective = objectives.Objective.sum([objectives.channel("fc", c, batch=i) for i, c in enumerate(classes)])
    images = render.render_vis(model, objective, lambda: param.image(24, batch=3, fft=fft, decorrelate=decorrelate),
                               transforms=[], preprocess=False, thresholds=(1, 2, 3), show_image=False,
                               progress=False, fixed_image_size=24)
    for steps, theirs in zip((1, 2, 3), images):
        ours = cf.class_visualization(model, classes, size=24, steps=steps, lr=0.05, transforms=None, seed=7,
                                      parametrization="fourier" if fft else "pixel", decorrelate=decorrelate,
                                      redirected_relu_steps=0)  # Lucent has no redirected ReLU
        assert torch.allclose(ours.images, torch.from_numpy(theirs).permute(0, 3, 1, 2), atol=1e-5, rtol=0)


class _NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: cf.class_visualization(m, 6, size=8, steps=1), ValueError, "classes: 6 is out of range"),
    (lambda m: cf.class_visualization(m, [], size=8, steps=1), TypeError, "classes: expected"),
    (lambda m: cf.feature_visualization(m, LAST, 64, size=8, steps=1), ValueError, "channels: 64 is out of range"),
    (lambda m: cf.feature_visualization(m, "fc", 0, size=8, steps=1), ValueError, "layer: 'fc' gives a 2-D"),
    (lambda m: cf.feature_visualization(m, LAST, 0, position=(9, 0), size=8, steps=1, transforms=None),
     ValueError, "position"),
    (lambda m: cf.feature_visualization(m, LAST, size=8, steps=1), ValueError, "channels, direction"),
    (lambda m: cf.feature_visualization(m, LAST, direction=torch.ones(3), size=8, steps=1), ValueError, "direction"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=0), ValueError, "steps: expected an int >= 1"),
    (lambda m: cf.class_visualization(m, 0, size=0, steps=1), ValueError, "size: expected values >= 1"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=1, lr=math.nan), ValueError, "lr: expected a finite"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=1, lr=math.inf), ValueError, "lr: expected a finite"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=1, parametrization="cppn"), ValueError, "parametrization"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=1, blur_every=2), ValueError, "blur_every"),
    (lambda m: cf.class_visualization(m, 0, size=8, steps=1, redirected_relu_steps=-1), ValueError,
     "redirected_relu_steps: expected an int >= 0"),
    (lambda m: cf.feature_visualization(m, LAST, 0, size=8, steps=1, redirected_relu_steps=1.5), TypeError,
     "redirected_relu_steps"),
    (lambda m: cf.feature_inversion(m, torch.rand(1, 3, 8, 8), "fc", steps=1), ValueError, "layer: 'fc'"),
    (lambda m: cf.feature_inversion(m, torch.rand(1, 1, 8, 8), LAST, steps=1), ValueError, "x: expected RGB"),
    (lambda m: cf.feature_inversion(m, torch.rand(1, 3, 8, 8), LAST, tv_weight=-1, steps=1), ValueError, "tv_weight"),
    (lambda m: cf.texture_synthesis(m, torch.rand(1, 3, 8, 8), [], steps=1), TypeError, "layers"),
    (lambda m: cf.style_transfer(m, torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8), content_layer=LAST,
                                 style_layers=FIRST, steps=1), ValueError, "style: expected 1 or 2"),
    (lambda m: cf.style_transfer(m, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), content_layer=LAST,
                                 style_layers=FIRST, init="noise", steps=1), ValueError, "init"),
    (lambda m: cf.filter_grid(m, "features.1"), ValueError, "layer: expected an nn.Conv2d"),
    (lambda m: cf.filter_grid(_NoConv()), ValueError, "has no nn.Conv2d"),
])
def test_bad_input(model, call, error, match):
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        call(model)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training


@pytest.mark.parametrize("parametrization, decorrelate", [("fourier", True), ("fourier", False), ("pixel", True)])
@pytest.mark.parametrize("size", [(12, 12), (9, 13)])  # odd width: Lucent's extra frequency column
def test_image_param_starts_from_given_images(parametrization, decorrelate, size):
    from cnnviz_fast.synthesis._image import ImageParam
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    param = ImageParam(2, size, parametrization, decorrelate, None, torch.device("cpu"), init=images)
    assert torch.allclose(param(), images.clamp(1e-3, 1 - 1e-3), atol=1e-5)


def test_style_transfer_from_content_starts_at_the_content(model, held_out):
    content = held_out[:1]
    result = cf.style_transfer(model, content, held_out[1:2], content_layer=LAST, style_layers=FIRST, init="content",
                               steps=1, parametrization="fourier", decorrelate=True)
    # at the content image itself, up to the clamp to [1e-3, 1 - 1e-3] (a random image: about 5)
    assert float(result.trace[0, 0, 0]) < 1e-4
