"""SCOUTER (Li et al., ICCV 2021): the xSlot head, the explanation, training, shipped weights."""
import math

import pytest
import torch
from torch import nn

from cnnviz_fast import (ScouterHead, has_scouter_head, scouter_explain, scouter_model, train_scouter,
                         upsample_normalize)
from cnnviz_fast.data import SHAPE_CLASSES, shapes
from cnnviz_fast.explain.scouter import _sine_position_embedding
from cnnviz_fast.models import shapes_scouter, shapes_scouter_weights, train_scouter as script


def _tiny_model(positive=True, slots_per_class=1, num_classes=3, **head):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True))
    return scouter_model(backbone, ScouterHead(8, num_classes, slots_per_class=slots_per_class, positive=positive,
                                               **{"hidden_dim": 8, **head})).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the head against the paper's and the authors' definitions ---------------------------------

def test_sine_embedding_matches_detr_formula():
    # DETR / the authors' PositionEmbeddingSine(normalize=True), written out channel by channel.
    h, w, dim = 3, 5, 8
    pe = _sine_position_embedding(h, w, dim, "cpu", torch.float64)
    feats = dim // 2
    for i in range(h):
        for j in range(w):
            y, x = (i + 1) / (h + 1e-6) * 2 * math.pi, (j + 1) / (w + 1e-6) * 2 * math.pi
            for c in range(feats):
                t = 10000 ** (2 * (c // 2) / feats)
                trig = math.sin if c % 2 == 0 else math.cos
                assert pe[c, i, j].item() == pytest.approx(trig(y / t), abs=1e-6)
                assert pe[feats + c, i, j].item() == pytest.approx(trig(x / t), abs=1e-6)


def test_logits_are_attention_weighted_evidence_summed_per_class():
    model = _tiny_model(slots_per_class=2)
    head = model.head
    x = torch.rand(4, 3, 12, 10)
    logits, attention = model.attend(x)
    assert attention.shape == (4, 6, 6, 5) and ((attention > 0) & (attention < 1)).all()
    v = torch.relu(head.project(model.backbone(x))).mean(1, keepdim=True)  # mean over channels of the values
    per_slot = (attention * v).sum((2, 3))
    torch.testing.assert_close(logits, per_slot.view(4, 3, 2).sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.class_attention(attention), attention.view(4, 3, 2, 6, 5).sum(2))
    assert head.area_loss(attention).item() == pytest.approx(head.lambda_area * attention.mean().item() ** 2)


def test_key_layers_are_the_authors_to_k_mlp():
    head = ScouterHead(8, 2, hidden_dim=8, key_layers=3)
    assert [type(m).__name__ for m in head.to_k] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert len(ScouterHead(8, 2, hidden_dim=8).to_k) == 1


def test_negative_head_negates_the_same_evidence():
    pos, neg = _tiny_model(True), _tiny_model(False)
    neg.load_state_dict(pos.state_dict())
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(neg(x), -pos(x))


# --- the explanation ----------------------------------------------------------------------------

def test_explain_is_batched_and_leaves_the_model_as_found():
    model = _tiny_model(slots_per_class=2)
    x = torch.rand(5, 3, 16, 16)
    before = _state(model)
    all_maps = scouter_explain(model, x, None, size=None, normalize=False)
    assert all_maps.shape == (5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(all_maps, model.head.class_attention(model.attend(x)[1]))
    one = scouter_explain(model, x, torch.tensor([0, 1, 2, 0, 1]))
    assert one.shape == (5, 16, 16)
    torch.testing.assert_close(one.amin((1, 2)), torch.zeros(5))
    torch.testing.assert_close(one.amax((1, 2)), torch.ones(5))
    k = scouter_explain(model, x, torch.tensor([[2, 0]] * 5))
    torch.testing.assert_close(k[:, 1], scouter_explain(model, x, 0))
    torch.testing.assert_close(k, upsample_normalize(all_maps[:, [2, 0]], (16, 16)))
    # One image at a time gives the same maps as the batch.
    torch.testing.assert_close(scouter_explain(model, x[3:4], 2), k[3:4, 0], rtol=1e-5, atol=1e-6)
    assert not model.training and all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    assert not model.head._forward_hooks and has_scouter_head(model) and not has_scouter_head(model.backbone)


def test_explain_finds_a_head_inside_any_module():
    inner = _tiny_model()
    wrapper = nn.Sequential(nn.Identity(), inner)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(scouter_explain(wrapper, x, 1), scouter_explain(inner, x, 1))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes: expected an int >= 1"),
    ({"slots_per_class": 0}, "slots_per_class: expected an int >= 1"),
    ({"iters": 0}, "iters: expected an int >= 1"),
    ({"hidden_dim": 6}, "hidden_dim: expected a multiple of 4"),
    ({"key_layers": 0}, "key_layers: expected an int >= 1"),
    ({"lambda_area": -1.0}, "lambda_area: expected >= 0"),
])
def test_bad_head_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScouterHead(8, **{"num_classes": 3, **kwargs})


def test_bad_inputs_name_the_argument():
    flat = scouter_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), ScouterHead(8, 3, hidden_dim=8))
    with pytest.raises(ValueError, match=r"backbone: expected a 4-D feature map \[B, C, h, w\], got \(2, "):
        flat(torch.rand(2, 3, 8, 8))
    model = _tiny_model()
    with pytest.raises(ValueError, match="target: class 3 is out of range"):
        scouter_explain(model, torch.rand(2, 3, 8, 8), [0, 3])
    with pytest.raises(TypeError, match="target: SCOUTER explains classes"):
        scouter_explain(model, torch.rand(2, 3, 8, 8), lambda out: out[:, 0])
    with pytest.raises(ValueError, match="model: expected exactly one ScouterHead, found 0"):
        scouter_explain(model.backbone, torch.rand(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="features: expected 8 channels"):
        model.head(torch.rand(1, 5, 4, 4))
    with pytest.warns(UserWarning, match="model: is in training mode"):
        scouter_explain(scouter_model(nn.BatchNorm2d(3), ScouterHead(3, 2, hidden_dim=4)).train(),
                        torch.rand(2, 3, 4, 4), 0)
    with pytest.raises(TypeError, match="head: expected a ScouterHead"):
        scouter_model(model.backbone, nn.Linear(8, 3))


# --- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze", [True, False])
def test_train_scouter_learns_and_freezes_the_backbone(freeze):
    # Two classes a 1x1-feature backbone tells apart: bright top half vs bright bottom half.
    x = torch.rand(64, 3, 8, 8) * 0.2
    y = torch.arange(64) % 2
    x[y == 0, :, :4] += 0.8
    x[y == 1, :, 4:] += 0.8
    model = _tiny_model(num_classes=2, hidden_dim=16, lambda_area=0.1).train()
    backbone_before = _state(model.backbone)
    history = train_scouter(model, (x, y), epochs=10, seed=0, batch_size=16, lr=1e-2, freeze_backbone=freeze,
                            progress=False)
    assert len(history) == 10 and history[-1] < history[0]
    assert model.training  # mode restored
    unchanged = all(torch.equal(v, backbone_before[n]) for n, v in model.backbone.state_dict().items())
    assert unchanged == freeze
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).float().mean() >= 0.9


# --- the shipped weights (300 held-out images; README has the full 1,000) ------------------------

@pytest.fixture(scope="module")
def held_out():
    return shapes(300, seed=script.HELD_OUT_SEED)


@pytest.fixture(scope="module")
def shipped_metrics(held_out):
    """metrics(positive): train_scouter.evaluate of the shipped SCOUTER+ / SCOUTER- on held_out, once each."""
    cache = {}

    def metrics(positive):
        if positive not in cache:
            cache[positive] = script.evaluate(shapes_scouter(positive=positive), held_out)
        return cache[positive]
    return metrics


@pytest.mark.parametrize("positive", [True, False], ids=["SCOUTER+", "SCOUTER-"])
def test_shipped_weights_are_small_and_accurate(positive, shipped_metrics):
    assert shapes_scouter_weights(positive).stat().st_size < 256 * 1024
    model = shapes_scouter(positive=positive)
    assert not model.training and model.head.positive == positive and model.head.num_classes == len(SHAPE_CLASSES)
    assert shipped_metrics(positive)["accuracy"] >= 0.95, shipped_metrics(positive)


def test_shipped_scouter_plus_points_at_the_shape(shipped_metrics):
    assert shipped_metrics(True)["pointing"] >= 0.90, shipped_metrics(True)


def test_shipped_scouter_minus_finds_least_evidence_against_the_truth(shipped_metrics):
    metrics = shipped_metrics(False)
    assert metrics["true_total"] < metrics["other_total"], metrics
    assert metrics["least_attention"] >= 0.95, metrics


def test_relabelled_shapes_draw_the_counterpart_in_the_same_place():
    # confusable_pairs renders B where A was drawn by reordering the class names.
    names = tuple(script.CONFUSABLE.get(c, c) for c in SHAPE_CLASSES)
    data, other = shapes(60, seed=3), shapes(60, seed=3, classes=names)
    assert torch.equal(data.labels, other.labels)
    outside = ~(data.masks | other.masks)
    assert torch.equal(data.images.permute(1, 0, 2, 3)[:, outside], other.images.permute(1, 0, 2, 3)[:, outside])
    ring = data.labels == SHAPE_CLASSES.index("ring")
    hole = other.masks[ring] & ~data.masks[ring]  # the circle drawn over each ring covers it, plus its hole
    assert not (data.masks[ring] & ~other.masks[ring]).any() and hole.flatten(1).sum(1).min() > 20


def test_shipped_scouter_minus_on_confusable_pairs():
    # The telling region is where the two drawings differ (README, "confusable pairs"). Held:
    # every wrong-class map puts at least twice chance on it, and on circles the map of "ring"
    # peaks on the filled centre, preferred over the rest of the two shapes. Not held, so not
    # asserted: the map of "circle" on rings favours the band over the hole, the map of "cross"
    # on stars the star's centre over the arms they do not share.
    pairs = script.confusable_pairs(shapes_scouter(positive=False), 300)
    assert set(pairs) == {"ring->circle", "circle->ring", "star->cross", "cross->star"}
    assert all(p["images"] == 50 and p["enrichment"] >= 2 for p in pairs.values()), pairs
    assert pairs["circle->ring"]["peak_in_region"] >= 0.8, pairs
    assert pairs["circle->ring"]["footprint_enrichment"] >= 1.5, pairs
    assert pairs["cross->star"]["enriched_2x"] >= 0.9, pairs
