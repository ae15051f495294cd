"""cnnviz_fast.metrics: hand-worked tiny examples, Quantus 0.6 on the default model, batch-size
independence and bad inputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnviz_fast import metrics
from tests._peers import import_quantus
from tests.helpers import assert_close


def _linear(weights):
    """A linear 2-class model on [B, C, H, W] inputs: class 0 scores sum(w * x), class 1 zero."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 2, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0] = w.flatten()
    return model.eval()


# ---------------------------------------------------------------- hand-worked faithfulness

def test_pixel_flipping_hand_worked():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    a = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])  # order: 2, 3, 4, 1
    model = _linear(torch.ones(4))
    curves = metrics.pixel_flipping(model, x, 0, a, softmax=False)
    assert torch.equal(curves, torch.tensor([[8.0, 5.0, 1.0, 0.0]]))
    two = metrics.pixel_flipping(model, x, 0, a, features_in_step=2, baseline=-1.0, softmax=False)
    assert torch.equal(two, torch.tensor([[3.0, -4.0]]))  # 1 + 4 - 2 ; then all -1


def test_pixel_flipping_pixels_move_all_channels():
    x = torch.ones(1, 2, 1, 2)
    model = _linear(torch.tensor([1.0, 10.0, 100.0, 1000.0]))  # channel 0: (1, 10), channel 1: (100, 1000)
    curves = metrics.pixel_flipping(model, x, 0, torch.tensor([[[1.0, 2.0]]]), softmax=False)
    assert torch.equal(curves, torch.tensor([[101.0, 0.0]]))  # pixel 1 (10 + 1000) first
    per_element = metrics.pixel_flipping(model, x, 0, torch.tensor([[[[4.0, 3.0]], [[2.0, 1.0]]]]), softmax=False)
    assert torch.equal(per_element, torch.tensor([[1110.0, 1100.0, 1000.0, 0.0]]))


def test_pixel_flipping_named_baselines():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    model = _linear(torch.ones(4))
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    run = lambda b: metrics.pixel_flipping(model, x, 0, a, features_in_step=4, baseline=b, softmax=False)  # noqa: E731
    assert run("black").item() == 4.0 and run("white").item() == 24.0 and run("mean").item() == 12.0
    assert run(torch.tensor([[1.0, 0.0], [0.0, 0.0]])).item() == 1.0


def test_region_perturbation_hand_worked():
    # 3x3 image, 2x2 patches: Quantus pads 0 before and 1 after, so regions are
    # {(0..1, 0..1)}, {(0..1, 2)}, {(2, 0..1)}, {(2, 2)}.
    x = torch.ones(1, 1, 3, 3)
    w = torch.arange(1.0, 10.0)
    model = _linear(w)
    a = torch.tensor([[[0.0, 0, 5], [0, 0, 5], [1, 1, 9]]])  # sums: 0, 10, 2, 9
    drops = metrics.region_perturbation(model, x, 0, a, patch_size=2, softmax=False)
    # removed in order: right column (3 + 6), corner (9), bottom row (7 + 8), top-left block
    assert torch.equal(drops, torch.tensor([[9.0, 18.0, 33.0, 45.0]]))
    lerf = metrics.region_perturbation(model, x, 0, a, patch_size=2, order="lerf", regions=2, softmax=False)
    assert torch.equal(lerf, torch.tensor([[12.0, 27.0]]))


def test_deletion_and_insertion_hand_worked():
    x = torch.ones(1, 1, 2, 2)
    model = _linear(torch.ones(4))
    sal = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    curves, area = metrics.deletion(model, x, 0, sal, steps=2, softmax=False)
    assert torch.equal(curves, torch.tensor([[4.0, 2.0, 0.0]]))
    assert area.item() == pytest.approx(2.0)  # 0.5 * (4 + 2) / 2 + 0.5 * (2 + 0) / 2
    # a saliency map at half the resolution is resized to the input
    curves_small, _ = metrics.deletion(_linear(torch.ones(16)), torch.ones(1, 1, 4, 4), 0, torch.rand(1, 2, 2), steps=4, softmax=False)
    assert torch.equal(curves_small, torch.tensor([[16.0, 12.0, 8.0, 4.0, 0.0]]))
    blurred = metrics._engine.blur(x)
    ins, area = metrics.insertion(model, x, 0, sal, steps=4, softmax=False)
    # the blurred start has the 11x11 Gaussian's mass over the 2x2 image at every pixel
    expected = [blurred.sum() + sum(1 - blurred[0, 0].flatten()[:k]) for k in range(5)]
    assert_close(ins[0], torch.stack(expected), rtol=1e-6, atol=1e-6, what="insertion curve")
    assert area.item() == pytest.approx(torch.trapezoid(torch.stack(expected), dx=0.25).item(), rel=1e-6)


def test_auc_is_the_trapezoid_rule():
    assert metrics.auc(torch.tensor([[0.0, 1.0, 1.0]])).item() == 1.5
    assert metrics.auc(torch.tensor([1.0, 3.0]), dx=0.5).item() == 1.0


def test_faithfulness_correlation_of_exact_contributions():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 4, 4)
    w = torch.randn(16)
    model = _linear(w)
    contributions = (w.view(1, 4, 4) * x[:, 0])
    kw = dict(runs=20, subset_size=5, softmax=False)
    assert_close(metrics.faithfulness_correlation(model, x, 0, contributions, **kw), torch.ones(2), atol=1e-5)
    assert_close(metrics.faithfulness_correlation(model, x, 0, -contributions, **kw), -torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------- localisation and complexity

A = torch.tensor([[[0.1, 0.9, 0.0], [0.2, 0.3, 0.4], [0.0, 0.0, 0.1]]])
M = torch.tensor([[[False, False, False], [True, True, False], [False, False, False]]])


def test_localisation_hand_worked():
    assert metrics.pointing_game(A, M).tolist() == [0.0]  # the max (0, 1) is off the mask
    assert metrics.pointing_game(A, M, tolerance=1).tolist() == [1.0]  # (1, 1) is 1 px away
    assert metrics.relevance_mass_accuracy(A, M).item() == pytest.approx(0.5 / 2.0)
    # K = 2: the two highest are 0.9 (off) and 0.4 (off)
    assert metrics.relevance_rank_accuracy(A, M).item() == 0.0
    assert metrics.relevance_rank_accuracy(A, A > 0.25).item() == 1.0
    assert metrics.attribution_localisation(-A, M).item() == pytest.approx(0.5 / 2.0, rel=1e-6)
    # the mask's box is rows 1, cols 0..1; negative relevance counts as nothing
    signed = A.clone()
    signed[0, 2, 2] = -5.0
    assert metrics.energy_pointing_game(signed, M).item() == pytest.approx(0.5 / 1.9)


def test_empty_masks_give_nan_with_a_warning():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0] = M[0]
    a = A.repeat(2, 1, 1)
    for fn in (metrics.pointing_game, metrics.energy_pointing_game, metrics.relevance_mass_accuracy,
               metrics.relevance_rank_accuracy, metrics.attribution_localisation):
        with pytest.warns(RuntimeWarning, match="empty"):
            out = fn(a, masks)
        assert not math.isnan(out[0].item()) and math.isnan(out[1].item()), fn.__name__


def test_complexity_hand_worked():
    one_hot = torch.zeros(1, 2, 2)
    one_hot[0, 0, 0] = -3.0  # |a| is used
    uniform = torch.ones(1, 2, 2)
    n, e = 4, 1e-7
    assert metrics.sparseness(one_hot).item() == pytest.approx(3 * (1 + e) / (n * (1 + 4 * e)) - 3 * e / (n * (1 + 4 * e)))
    assert metrics.sparseness(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics.complexity(uniform).item() == pytest.approx(math.log(4), rel=1e-9)
    assert metrics.complexity(one_hot).item() == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- randomisation

def test_model_randomization_keeps_the_model_and_keys_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)).eval()
    for p in model[0].parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 4, 4)
    rng = torch.get_rng_state()
    from cnnviz_fast import saliency
    out = metrics.model_randomization(model, x, 0, saliency)
    assert list(out) == ["3", "0"] and all(v.shape == (2,) for v in out.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not model[0].weight.requires_grad and torch.equal(rng, torch.get_rng_state())
    # an explanation that ignores the model is perfectly similar after every randomisation
    same = metrics.model_randomization(model, x, 0, lambda m, x, t: x[:, 0] ** 2, order="independent")
    assert all(torch.allclose(v, torch.ones(2)) for v in same.values())


def test_random_logit_draws_another_class():
    model = _linear(torch.ones(4))
    x = torch.randn(3, 1, 2, 2)
    seen = []
    assert torch.allclose(metrics.random_logit(model, x, 1, lambda m, x, t: (seen.append(t), x)[1]), torch.ones(3))
    assert torch.equal(seen[0], torch.ones(3, dtype=torch.long)) and torch.equal(seen[1], torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- engine properties and bad input

@pytest.fixture(scope="module")
def shapes_batch():
    from cnnviz_fast.data import shapes
    from cnnviz_fast.models import shapes_cnn
    data = shapes(4, seed=1)
    return shapes_cnn().eval(), data.images, data.labels, data.masks


def test_results_do_not_depend_on_the_batch_size(shapes_batch):
    model, x, y, _ = shapes_batch
    a = torch.rand(4, 64, 64)
    whole = metrics.pixel_flipping(model, x, y, a, features_in_step=1024)
    chunked = metrics.pixel_flipping(model, x, y, a, features_in_step=1024, batch_size=3)
    one = torch.cat([metrics.pixel_flipping(model, x[i:i + 1], y[i:i + 1], a[i:i + 1], features_in_step=1024)
                     for i in range(4)])
    assert_close(chunked, whole, rtol=1e-5, atol=1e-6, what="batch_size=5")
    assert_close(one, whole, rtol=1e-5, atol=1e-6, what="one image at a time")
    # and the curve is the model on the definition's copies
    copies = x[:1].repeat(4, 1, 1, 1)
    order = torch.argsort(a[0].flatten(), descending=True)
    for s in range(4):
        copies[s].view(3, -1)[:, order[:1024 * (s + 1)]] = 0.0
    with torch.no_grad():
        expected = model(copies).softmax(1)[:, y[0]]
    assert_close(whole[0, :4], expected, rtol=1e-5, atol=1e-6, what="definition")


def test_bad_inputs_name_the_argument(shapes_batch):
    model, x, y, masks = shapes_batch
    a = torch.rand(4, 64, 64)
    with pytest.raises(ValueError, match="attributions: expected shape"):
        metrics.pixel_flipping(model, x, y, a[:, :32])
    nan = a.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"attributions: contains NaN \(first at index \(1, 2, 3\)\)"):
        metrics.pixel_flipping(model, x, y, nan)
    with pytest.raises(ValueError, match="features_in_step: 7 does not divide"):
        metrics.pixel_flipping(model, x, y, a, features_in_step=7)
    with pytest.raises(ValueError, match="baseline: expected .* got 'grey'"):
        metrics.pixel_flipping(model, x, y, a, features_in_step=4096, baseline="grey")
    with pytest.raises(TypeError, match="target: expected an int or one class per image"):
        metrics.pixel_flipping(model, x, lambda out: out[:, 0], a, features_in_step=4096)
    with pytest.raises(ValueError, match="masks: expected shape"):
        metrics.pointing_game(a, masks[:, :10])
    with pytest.raises(ValueError, match="saliency"):
        metrics.deletion(model, x, y, a[:2])
    model.train()
    try:
        with pytest.raises(ValueError, match="model: is in training mode"):
            metrics.region_perturbation(model, x, y, a)
    finally:
        model.eval()


# ---------------------------------------------------------------- against Quantus 0.6

@pytest.fixture(scope="module")
def quantus():
    q = import_quantus()
    if q is None:
        pytest.skip("quantus is not installed (pip install --no-deps quantus==0.6.0)")
    return q


@pytest.fixture()
def trapz(monkeypatch):
    # Quantus' AUC helper calls np.trapz, which numpy 2.4 removed.
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("baseline", ["black", 0.3])
def test_pixel_flipping_equals_quantus(quantus, shapes_batch, baseline, trapz):
    from cnnviz_fast.data import shapes
    model, _, y, _ = shapes_batch
    # Quantus wants features_in_step to divide H * W: 48 * 48 = 2304 = 3 * 768 pixels' elements
    x = shapes(2, size=48, seed=1).images
    a = torch.rand(2, 48, 48)
    ours = metrics.pixel_flipping(model, x[:2], y[:2], a, features_in_step=256, baseline=baseline)
    theirs = quantus.PixelFlipping(features_in_step=3 * 256, perturb_baseline=baseline, disable_warnings=True)(
        model=model, x_batch=_np(x[:2]), y_batch=_np(y[:2]), a_batch=_np(a[:, None]), channel_first=True,
        softmax=True, device="cpu")
    assert_close(ours, torch.tensor(theirs), rtol=1e-5, atol=1e-6, what="pixel flipping vs Quantus")
    per_element = torch.rand(2, 3, 48, 48)
    ours = metrics.pixel_flipping(model, x[:2], y[:2], per_element, features_in_step=768, softmax=False)
    theirs = quantus.PixelFlipping(features_in_step=768, perturb_baseline=0.0, disable_warnings=True,
                                   return_auc_per_sample=True)(
        model=model, x_batch=_np(x[:2]), y_batch=_np(y[:2]), a_batch=_np(per_element), channel_first=True,
        softmax=False, device="cpu")
    assert_close(metrics.auc(ours), torch.tensor(theirs), rtol=1e-5, atol=1e-4, what="pixel flipping AUC")


@pytest.mark.parametrize("order,size", [("morf", 8), ("lerf", 10)])
def test_region_perturbation_equals_quantus(quantus, shapes_batch, order, size):
    model, x, y, _ = shapes_batch
    a = torch.rand(2, 64, 64)
    ours = metrics.region_perturbation(model, x[:2], y[:2], a, patch_size=size, order=order, regions=12,
                                       baseline="black")
    theirs = quantus.RegionPerturbation(patch_size=size, order=order, regions_evaluation=12, perturb_baseline="black",
                                        disable_warnings=True)(
        model=model, x_batch=_np(x[:2]), y_batch=_np(y[:2]), a_batch=_np(a[:, None]), channel_first=True,
        softmax=True, device="cpu")
    assert_close(ours, torch.tensor(np.array(theirs)), rtol=1e-5, atol=1e-6, what="region perturbation vs Quantus")


def test_localisation_and_complexity_equal_quantus(quantus, shapes_batch):
    model, x, y, masks = shapes_batch
    a = torch.rand(4, 64, 64) - 0.2
    a[0] = a[0].abs()  # one map whose maximum may sit anywhere, one with a hit for sure
    a[1][masks[1]] += 2.0
    pairs = [(metrics.pointing_game, quantus.PointingGame), (metrics.relevance_mass_accuracy, quantus.RelevanceMassAccuracy),
             (metrics.relevance_rank_accuracy, quantus.RelevanceRankAccuracy),
             (metrics.attribution_localisation, quantus.AttributionLocalisation)]
    kw = dict(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a[:, None]), channel_first=True, device="cpu")
    for ours, peer in pairs:
        theirs = peer(disable_warnings=True)(s_batch=_np(masks[:, None]), **kw)
        assert_close(ours(a, masks), torch.tensor(theirs, dtype=torch.float64), rtol=1e-6, atol=1e-9, what=ours.__name__)
    for ours, peer in [(metrics.sparseness, quantus.Sparseness), (metrics.complexity, quantus.Complexity)]:
        theirs = peer(disable_warnings=True)(**kw)
        assert_close(ours(a), torch.tensor(theirs, dtype=torch.float64), rtol=1e-6, atol=1e-9, what=ours.__name__)


def test_randomisation_equals_quantus(quantus, shapes_batch):
    model, x, y, _ = shapes_batch
    from cnnviz_fast import saliency
    method = lambda m, x, t: saliency(m, x, t).sum(1)  # noqa: E731
    explain = lambda model, inputs, targets, **_: _np(method(model, torch.as_tensor(inputs), torch.as_tensor(targets)))  # noqa: E731
    ours = metrics.random_logit(model, x[:2], y[:2], method, seed=42)
    theirs = quantus.RandomLogit(num_classes=model.fc.out_features if hasattr(model, "fc") else 5, seed=42,
                                 similarity_func=quantus.similarity_func.correlation_spearman,
                                 disable_warnings=True)(
        model=model, x_batch=_np(x[:2]), y_batch=_np(y[:2]), a_batch=None, explain_func=explain, channel_first=True,
        device="cpu")
    assert_close(ours, torch.tensor(theirs, dtype=torch.float32), rtol=1e-4, atol=1e-5, what="random logit")
    # MPRT on a small convolutional net: Quantus explains the whole batch once per layer
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(64, 5)).eval()
    ours = metrics.model_randomization(model, x[:2], y[:2], method, seed=42)
    theirs = quantus.MPRT(seed=42, similarity_func=quantus.similarity_func.correlation_spearman, abs=False,
                          normalise=False, disable_warnings=True)(
        model=model, x_batch=_np(x[:2]), y_batch=_np(y[:2]), a_batch=None, explain_func=explain, channel_first=True,
        device="cpu")
    theirs.pop("original", None)
    assert list(ours) == list(theirs)
    for name in ours:
        assert_close(ours[name], torch.tensor(theirs[name], dtype=torch.float32), rtol=1e-4, atol=1e-5, what=name)
    last = metrics.model_randomization(model, x[:2], y[:2], method, seed=42, last_only=True)
    assert list(last) == list(ours)[-1:] and torch.equal(last[list(ours)[-1]], ours[list(ours)[-1]])
