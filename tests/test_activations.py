"""layer_activations, activation_grid, TopKPatches / top_k_patches (against the store-all
reference, across batch sizes, interrupted and resumed), crop_patches and patch_grid."""
import warnings

import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast import models
from cnnviz_fast.reference import channel_topk_ref


def _integer_net():
    """Small CNN with integer weights: on integer images every sum is exact in float32, so
    layer outputs are bit-identical whatever the batching (and full of ties)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _integer_net()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 3, (37, 3, 16, 16), generator=torch.Generator().manual_seed(2)).float()


def _store_all(model, images, layer, k, batch=None):
    batches = images.split(batch or len(images))
    acts = torch.cat([cf.layer_activations(model, b, layer) for b in batches])
    return channel_topk_ref(acts.double(), torch.arange(len(images)), k)


def _assert_result(res, expected, what=""):
    w = res.feature_size[1]
    flat = torch.where(res.positions[..., 0] >= 0, res.positions[..., 0] * w + res.positions[..., 1], -1)
    assert torch.equal(res.values.double(), expected[0]), what
    assert torch.equal(res.ids, expected[1]), what
    assert torch.equal(flat, expected[2]), what


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_activations_stops_after_the_layer(net, images):
    ran = []
    handle = net[7].register_forward_hook(lambda *a: ran.append(1))
    acts = cf.layer_activations(net, images[:4], "3")
    handle.remove()
    assert not ran and _no_hooks(net) and not acts.requires_grad
    assert torch.equal(acts, net[3](net[2](net[1](net[0](images[:4])))))


def test_activation_grid():
    acts = torch.zeros(5, 3, 4)
    acts[1, 0, 0] = 2.0
    grid = cf.activation_grid(acts[None], channels=[0, 1], nrow=2, size=8, cmap="gray", padding=1)
    assert grid.shape == (3, 10, 19)
    assert torch.equal(grid[:, 1:9, 1:9], torch.zeros(3, 8, 8))      # constant map: black
    assert torch.equal(grid[:, 1:3, 10:12], torch.ones(3, 2, 2))     # the maximum, enlarged 2x: white
    with pytest.raises(ValueError, match="channels: index 5 out of range"):
        cf.activation_grid(acts, channels=[5])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_equals_store_all_reference_for_every_batch_size(net, images, backend):
    expected = {layer: _store_all(net, images, layer, 4) for layer in ("1", "4")}
    for batch in (1, 5, 16, 37):
        res = cf.top_k_patches(net, images, ["1", "4"], k=4, batch_size=batch, progress=False, backend=backend)
        for layer in ("1", "4"):
            _assert_result(res[layer], expected[layer], f"layer {layer} batch {batch}")
    assert _no_hooks(net)


def test_real_resnet_layers_and_in_place_add():
    # layer1.0.bn2's output is later overwritten by `out += identity`: the hook must read it first.
    model = models.resnet18().eval()
    x = torch.rand(4, 3, 32, 32)
    layers = ["layer1.0.bn2", "layer2", "layer3"]
    res = cf.top_k_patches(model, x, layers, k=3, batch_size=2, progress=False)
    for layer in layers:
        _assert_result(res[layer], _store_all(model, x, layer, 3, batch=2), layer)
    assert res["layer3"].values.shape == (256, 3) and res["layer3"].feature_size == (2, 2)


def test_channel_selection_and_k_beyond_images(net, images):
    full = cf.top_k_patches(net, images[:3], "4", k=5, progress=False)["4"]
    part = cf.top_k_patches(net, images[:3], "4", k=5, channels=[4, 1], progress=False)["4"]
    assert part.channels.tolist() == [4, 1]
    assert torch.equal(part.values, full.values[[4, 1]]) and torch.equal(part.ids, full.ids[[4, 1]])
    assert (full.ids[:, 3:] == -1).all() and (full.positions[:, 3:] == -1).all()
    assert torch.isinf(full.values[:, 3:]).all()


class _Interrupt(Exception):
    pass


def _batches(images, size, fail_after=None):
    for n, start in enumerate(range(0, len(images), size)):
        if n == fail_after:
            raise _Interrupt
        yield images[start:start + size], torch.arange(start, min(start + size, len(images)))


def test_interrupted_run_resumes_exactly(net, images, tmp_path):
    ckpt = tmp_path / "run" / "topk.pt"
    whole = cf.top_k_patches(net, images, ["1", "4"], k=4, batch_size=4, progress=False)
    with pytest.raises(_Interrupt):  # dies during batch 7: batches 0-5 were saved at 3 and 6
        cf.top_k_patches(net, _batches(images, 4, fail_after=7), ["1", "4"], k=4, checkpoint=ckpt,
                         every=3, progress=False)
    state = torch.load(ckpt, weights_only=True)
    assert (state["batches_seen"], state["images_seen"]) == (6, 24)
    assert [p.name for p in ckpt.parent.iterdir()] == ["topk.pt"]  # no temporary file left
    resumed = cf.top_k_patches(net, _batches(images, 4), ["1", "4"], k=4, checkpoint=ckpt, every=3,
                               progress=False)
    for layer in ("1", "4"):
        for a, b in zip(resumed[layer][:4], whole[layer][:4]):
            assert torch.equal(a, b)
    assert torch.load(ckpt, weights_only=True)["images_seen"] == 37
    # resuming a tensor with another batch size skips by images, not batches
    ckpt2 = tmp_path / "second.pt"
    with pytest.raises(_Interrupt):
        cf.top_k_patches(net, _batches(images, 5, fail_after=3), "4", k=4, checkpoint=ckpt2, every=1,
                         progress=False)
    again = cf.top_k_patches(net, images, "4", k=4, batch_size=7, checkpoint=ckpt2, progress=False)
    assert torch.equal(again["4"].ids, whole["4"].ids) and torch.equal(again["4"].values, whole["4"].values)


def test_checkpoint_from_another_run_is_refused(net, images, tmp_path):
    ckpt = tmp_path / "c.pt"
    cf.top_k_patches(net, images[:8], ["1", "4"], k=4, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="layers="):
        cf.top_k_patches(net, images, ["4"], k=4, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="k=4"):
        cf.top_k_patches(net, images, ["1", "4"], k=3, checkpoint=ckpt, progress=False)
    other = _integer_net()
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(ValueError, match="different model"):
        cf.top_k_patches(other, images, ["1", "4"], k=4, checkpoint=ckpt, progress=False)


def test_image_folder_dataset(net, tmp_path):
    from cnnviz_fast.data import image_folder
    from cnnviz_fast.viz import save_image
    pics = torch.randint(0, 4, (6, 3, 16, 16)).float() / 3
    for i, pic in enumerate(pics):
        save_image(pic, tmp_path / f"{i}.png")
    dataset = image_folder(tmp_path, 16)
    got = cf.top_k_patches(net, dataset, "4", k=3, batch_size=4, progress=False)["4"]
    as_tensor = torch.stack([dataset[i][0] for i in range(len(dataset))])
    expected = cf.top_k_patches(net, as_tensor, "4", k=3, progress=False)["4"]
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.values, expected.values)


def test_map_style_dataset_and_progress_bar(net, images, capsys):
    dataset = torch.utils.data.TensorDataset(images[:9])  # items are 1-tuples; ids are indices
    got = cf.top_k_patches(net, dataset, "4", k=3, batch_size=4, progress=True)["4"]  # default: terminals only
    expected = cf.top_k_patches(net, images[:9], "4", k=3, progress=False)["4"]
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.values, expected.values)
    bar = capsys.readouterr().err
    assert "top_k_patches" in bar and "9/9" in bar


def test_train_mode_batchnorm_warns_and_mode_is_kept(images):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    with pytest.warns(UserWarning, match="training mode; cnnviz_fast explains it in eval mode"):
        cf.TopKPatches(model, "1").update(images[:2])
    assert model.training and model[1].training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.TopKPatches(model.eval(), "1").update(images[:2])
        cf.TopKPatches(nn.Sequential(nn.Conv2d(3, 2, 3)), "0").update(images[:2])  # nothing batch-dependent


def test_state_dict_round_trip_and_memory_is_c_by_k(net, images):
    run = cf.TopKPatches(net, ["1", "4"], k=2)
    run.update(images[:10], torch.arange(10))
    state = run.state_dict()
    assert sum(t.numel() for lists in state["lists"].values() for t in lists) == 3 * 2 * (6 + 5)
    twin = cf.TopKPatches(net, ["1", "4"], k=2)
    twin.load_state_dict(state)
    run.update(images[10:], torch.arange(10, 37))
    twin.update(images[10:], torch.arange(10, 37))
    for layer in ("1", "4"):
        assert all(torch.equal(a, b) for a, b in zip(run.result()[layer][:4], twin.result()[layer][:4]))


def test_bad_input_is_named(net, images):
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        cf.TopKPatches(net, "4", k=0)
    with pytest.raises(ValueError, match="channels .*index 9 out of range for 5"):
        cf.TopKPatches(net, "4", channels=[9]).update(images[:2])
    with pytest.raises(ValueError, match="'7' outputs \\[2, 3\\], expected a 4-D"):
        cf.TopKPatches(net, "7").update(images[:2])
    with pytest.raises(ValueError, match="ids: expected 2 integer ids"):
        cf.TopKPatches(net, "4").update(images[:2], torch.arange(3))
    with pytest.raises(ValueError, match="no module named"):
        cf.TopKPatches(net, "conv9")
    with pytest.raises(ValueError, match="runs more than once"):
        shared = nn.ReLU()
        twice = nn.Sequential(nn.Conv2d(3, 2, 1), shared, nn.Conv2d(2, 2, 1), shared, nn.Conv2d(2, 2, 1))
        cf.TopKPatches(twice.eval(), ["1", "4"]).update(images[:1])
    assert _no_hooks(net) and _no_hooks(twice)


def test_crop_patches_marks_padding_and_grid():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1)
    images = torch.zeros(2, 1, 5, 6)
    images[1, 0, 0, 0] = 9.0   # corner: unit (0, 0), field rows/cols -1..1
    images[0, 0, 2, 3] = 4.0   # interior: unit (2, 3)
    res = cf.top_k_patches(model, images, "0", k=3, progress=False)["0"]
    assert res.ids.tolist() == [[1, 0, -1]] and res.positions[0, :2].tolist() == [[0, 0], [1, 2]]
    rf = cf.receptive_field(model, "0", (5, 6))
    patches = cf.crop_patches(images, res, rf)
    assert patches.images.shape == (1, 3, 1, 3, 3) and patches.inside.shape == (1, 3, 3, 3)
    assert patches.inside[0, 0].tolist() == [[False] * 3, [False, True, True], [False, True, True]]
    assert patches.images[0, 0, 0].tolist() == [[0, 0, 0], [0, 9, 0], [0, 0, 0]]
    assert torch.equal(patches.images[0, 1, 0], images[0, 0, 0:3, 1:4]) and patches.inside[0, 1].all()
    assert not patches.inside[0, 2].any()  # empty slot
    grid = cf.patch_grid(patches, outside=0.5, padding=1)
    assert grid.shape == (1, 5, 13)
    assert grid[0, 1, 1].item() == 0.5 and grid[0, 2, 2].item() == 9.0
    with pytest.raises(ValueError, match="receptive_field: computed for"):
        cf.crop_patches(images, res, cf.receptive_field(model, "0", (4, 6)))
