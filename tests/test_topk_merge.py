"""TopKPatches.merge on its own (no Ray): runs over disjoint parts of a dataset, merged in any
order, equal the store-all reference and the single run exactly, ties included."""
import random

import pytest
import torch

import cnnviz_fast as cf
from cnnviz_fast.reference import channel_topk_ref
from tests.test_activations import _assert_result, _integer_net, _store_all

LAYERS = ["1", "4"]


@pytest.fixture(scope="module")
def net():
    return _integer_net()


@pytest.fixture(scope="module")
def images():
    # values in {0, 1, 2} on an integer net: many equal maxima, so the tie-break is exercised
    return torch.randint(0, 3, (41, 3, 16, 16), generator=torch.Generator().manual_seed(3)).float()


def _run_on(net, images, ids, k=4, **kw):
    run = cf.TopKPatches(net, LAYERS, k=k, **kw)
    for part in torch.arange(len(ids)).split(5):
        run.update(images[ids[part]], ids[part])
    return run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_disjoint_parts_equals_the_reference(net, images, seed):
    rng = random.Random(seed)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cuts = sorted(rng.sample(range(1, len(images)), 3))
    parts = torch.tensor_split(order, cuts)
    states = [_run_on(net, images, p).state_dict() for p in parts]
    rng.shuffle(states)
    merged = cf.TopKPatches(net, LAYERS, k=4)
    for state in states:
        merged.merge(state)
    single = _run_on(net, images, torch.arange(len(images)))
    assert merged.images_seen == len(images)
    for layer in LAYERS:
        expected = _store_all(net, images, layer, 4)
        _assert_result(merged.result()[layer], expected, f"seed {seed} layer {layer}")
        for a, b in zip(merged.result()[layer], single.result()[layer]):
            assert a == b if isinstance(a, tuple) else torch.equal(a, b)


def test_merge_is_idempotent_and_tolerates_an_image_counted_twice(net, images):
    ids = torch.arange(len(images))
    whole = _run_on(net, images, ids)
    again = _run_on(net, images, ids).merge(whole)   # every image counted twice
    overlap = _run_on(net, images, ids[:30]).merge(_run_on(net, images, ids[20:]))
    for layer in LAYERS:
        expected = _store_all(net, images, layer, 4)
        _assert_result(again.result()[layer], expected, "merged with itself")
        _assert_result(overlap.result()[layer], expected, "overlapping parts")


def test_merge_with_fewer_images_than_k_and_a_channel_selection(net, images):
    ids = torch.arange(6)
    parts = [_run_on(net, images, ids[i:i + 2], k=5, channels=[0, 2]) for i in (0, 2, 4)]
    merged = parts[0].merge(parts[1]).merge(parts[2].state_dict())
    for layer in LAYERS:
        acts = cf.layer_activations(net, images[:6], layer)[:, [0, 2]]
        _assert_result(merged.result()[layer], channel_topk_ref(acts.double(), ids, 5), layer)


def test_merge_refuses_other_settings(net, images):
    run = _run_on(net, images, torch.arange(4))
    other_k = _run_on(net, images, torch.arange(4, 8), k=3)
    with pytest.raises(ValueError, match="k=3.*refusing to merge"):
        run.merge(other_k)
    changed = _integer_net()
    with torch.no_grad():
        changed[0].bias += 1
    with pytest.raises(ValueError, match="different model.*refusing to merge"):
        run.merge(_run_on(changed, images, torch.arange(4)))
    bigger = cf.TopKPatches(net, LAYERS, k=4)
    bigger.update(torch.zeros(2, 3, 32, 32), torch.tensor([50, 51]))
    with pytest.raises(ValueError, match="another size"):
        run.merge(bigger)
    with pytest.raises(ValueError, match="not a TopKPatches state"):
        run.merge({"lists": {}})
