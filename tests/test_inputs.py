"""Focused checks of what users pass (issue 13): inputs against the model, targets, settings,
corrupt checkpoints, the backend variable, lazy submodules and progress bars."""
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import cnnviz_fast as cf
from cnnviz_fast._progress import progress_bar
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn


@pytest.fixture(scope="module")
def model():
    return shapes_cnn()


@pytest.fixture(scope="module")
def x():
    return shapes(3, seed=1).images


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_zero_size_maps_never_reach_a_kernel(backend):
    if backend == "cpp" and not cf.backends()["cpp"]["available"]:
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match=r"maps: has zero-size maps, shape \(2, 3, 0, 8\)"):
        cf.upsample_normalize(torch.rand(2, 3, 0, 8), (16, 16), backend=backend)
    with pytest.raises(ValueError, match=r"activations: has zero-size maps"):
        cf.cam_combine(torch.rand(2, 4, 3, 0), torch.rand(2, 4), (16, 16), backend=backend)
    assert cf.upsample_normalize(torch.rand(0, 3, 4, 8), (16, 16), backend=backend).shape == (0, 3, 16, 16)
    assert cf.cam_combine(torch.rand(0, 4, 3, 8), torch.rand(0, 2, 4), 16, backend=backend).shape == (0, 2, 16, 16)


def test_input_dtype_channels_and_dims_are_checked_against_the_model(model, x):
    with pytest.raises(TypeError, match=r"x: is torch.float64 but the model's parameters are torch.float32"):
        cf.saliency(model, x.double(), 0)
    with pytest.raises(ValueError, match=r"x: has 1 channels .* takes 3; repeat a grayscale channel"):
        cf.grad_cam(model, x[:, :1], 0, "features")
    rgba = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    with pytest.raises(ValueError, match=r"x: has 4 channels .* drop the alpha channel"):
        cf.occlusion(model, rgba, 0)
    with pytest.raises(ValueError, match=r"x: expected a batch \[B, C, H, W\] .* add a batch axis with x\[None\]"):
        cf.lrp(model, x[0], 0)


def test_the_models_own_error_names_x_and_keeps_the_message():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    with pytest.raises(ValueError, match=r"x: the model rejected shape \(2, 3, 9, 9\) .*mat1 and mat2") as info:
        cf.integrated_gradients(mlp, torch.rand(2, 3, 9, 9), 0, steps=2)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_non_finite_scores_name_the_target(x):
    class Overflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, inp):
            out = self.conv(inp).mean((2, 3))
            return torch.stack([out[:, 0], out[:, 1] * math.inf], 1)

    net = Overflowing().eval()
    with pytest.raises(ValueError, match=r"^target: has non-finite scores from the model"):
        cf.saliency(net, x, 1)
    cf.saliency(net, x, 0)  # the finite class is fine


def test_class_names_and_none_as_targets(model, x):
    predicted = model(x).argmax(1)
    torch.testing.assert_close(cf.saliency(model, x, None), cf.saliency(model, x, predicted))
    torch.testing.assert_close(cf.grad_cam(model, x, "star", "features"), cf.grad_cam(model, x, 4, "features"))
    names = ["circle", "ring", "star"]
    torch.testing.assert_close(cf.occlusion(model, x, names), cf.occlusion(model, x, [0, 5, 4]))
    pairs = cf.deeplift(model, x, [["circle", "square"]] * 3)
    assert pairs.shape == (3, 2, *x.shape[1:])
    with pytest.raises(ValueError, match=r"target: unknown class name 'hexagon'; the model's classes are"):
        cf.saliency(model, x, "hexagon")
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(TypeError, match=r"target: the class name\(s\) 'circle' need the model's class names"):
        cf.saliency(plain, x, "circle")
    assert not hasattr(plain, "class_names")


@pytest.mark.parametrize("target, error", [
    ([[0, 1], [2], [3, 4]], r"not a rectangular array of class indices"),
    (torch.zeros(3, 0, dtype=torch.long), r"a \[3, 0\] target names no class"),
    (2 ** 70, r"class 1180591620717411303424 is out of range"),
    ([2 ** 70, 0, 0], r"not a rectangular array .*Overflow"),
    (1.5, r"expected integer class indices"),
])
def test_bad_targets_get_clear_errors(model, x, target, error):
    with pytest.raises((ValueError, TypeError), match=rf"^target: .*{error}"):
        cf.saliency(model, x, target)


@pytest.mark.parametrize("call, error", [
    (lambda m, x: cf.smoothgrad(m, x, 0, memory_budget="1GB"), (TypeError, r"memory_budget: expected a finite number")),
    (lambda m, x: cf.integrated_gradients(m, x, 0, memory_budget=math.nan), (ValueError, r"memory_budget: .*got nan")),
    (lambda m, x: cf.occlusion(m, x, 0, mode="approximate", tau="0.5"), (TypeError, r"tau: expected a finite number in \(0, 1\]")),
    (lambda m, x: cf.occlusion(m, x, 0, memory_budget=math.nan), (ValueError, r"memory_budget:")),
    (lambda m, x: cf.smoothgrad(m, x, 0, method="saliency"), (TypeError, r"method: expected an attribution function")),
    (lambda m, x: cf.smoothgrad(m, x, 0, noise=math.inf), (ValueError, r"noise: expected a finite number >= 0, got inf")),
    (lambda m, x: cf.lrp(m, x, 0, "epsilon_gamma_box", gamma=-1, low=0.0, high=1.0), (ValueError, r"gamma: .*got -1")),
    (lambda m, x: cf.lrp(m, x, 0, epsilon=math.nan), (ValueError, r"epsilon: .*got nan")),
    (lambda m, x: cf.top_k_patches(m, x, "features", channels=[0.5], progress=False), (TypeError, r"channels .*an int")),
    (lambda m, x: cf.occlusion(m, x, 0, mode="fast"), (ValueError, r"mode: expected one of 'exact'")),
    (lambda m, x: cf.occlusion(m, x, 0, baseline=math.nan), (ValueError, r"baseline: expected a finite number")),
    (lambda m, x: cf.occlusion(m, x, 0, baseline=torch.full((3,), math.nan)), (ValueError, r"baseline: has non-finite")),
    (lambda m, x: cf.integrated_gradients(m, x, 0, baseline=torch.full_like(x, math.nan)), (ValueError, r"baseline: has non-finite")),
    (lambda m, x: cf.deeplift(m, x, 0, baseline=math.nan), (ValueError, r"baseline: expected a finite number")),
    (lambda m, x: cf.embed(m, x, "avgpool", progress="yes"), (TypeError, r"progress: expected None")),
    (lambda m, x: cf.activation_grid(cf.layer_activations(m, x[:1], "features"), channels=[1.5]),
     (TypeError, r"channels: expected an int")),
])
def test_bad_settings_name_the_argument_and_its_domain(model, x, call, error):
    kind, message = error
    with pytest.raises(kind, match=message):
        call(model, x)


@pytest.mark.parametrize("call", [
    lambda f, x: cf.saliency(f, x, 0), lambda f, x: cf.grad_cam(f, x, 0, "features"),
    lambda f, x: cf.occlusion(f, x, 0), lambda f, x: cf.lrp(f, x, 0),
    lambda f, x: cf.layer_activations(f, x, "features"), lambda f, x: cf.embed(f, x, "features"),
    lambda f, x: cf.top_k_patches(f, x, "features"), lambda f, x: cf.receptive_field(f, "features", 64),
])
def test_a_model_that_is_not_a_module_is_a_type_error(x, call):
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got function"):
        call(lambda t: t, x)


def test_train_mode_is_warned_once_per_process(model, x):
    model.train()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")  # Python's own filter: each location once
            cf.saliency(model, x, 0)
            cf.grad_cam(model, x, 0, "features")
        assert [str(w.message)[:30] for w in seen] == ["model: is in training mode; cn"]
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_corrupt_top_k_checkpoint_names_the_file(tmp_path, model, x, content):
    path = tmp_path / "run.ckpt"
    if content == "truncated":
        cf.top_k_patches(model, x, "features", k=2, checkpoint=path, progress=False)
        content = path.read_bytes()[:100]
    path.write_bytes(content)
    stale = tmp_path / ".run.ckpt.abc123.tmp"
    stale.write_bytes(b"half a save")
    with pytest.raises(ValueError, match=rf"checkpoint: {path} is not a TopKPatches checkpoint"):
        cf.top_k_patches(model, x, "features", k=2, checkpoint=path, progress=False)
    assert not stale.exists()


def test_feature_index_load_removes_stale_temps(tmp_path):
    pytest.importorskip("faiss")
    path = tmp_path / "v.fidx"
    cf.FeatureIndex(4).add(torch.rand(10, 4)).save(path)
    stale = tmp_path / ".v.fidx.xyz.tmp"
    stale.write_bytes(b"x" * 100)
    assert len(cf.FeatureIndex.load(path)) == 10 and not stale.exists()


def test_unknown_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv("CNNVIZ_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^CNNVIZ_BACKEND \(environment variable\): expected one of .*'fastest'"):
        cf.upsample_normalize(torch.rand(1, 1, 4, 4), 8)


def test_models_and_data_are_lazy_attributes_without_triton():
    code = ("import sys, cnnviz_fast as cf; assert 'cnnviz_fast.models' not in sys.modules; "
            "m = cf.models.resnet18(); d = cf.data.shapes(2); assert 'triton' not in sys.modules; "
            "print(type(m).__name__, d.images.shape[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ResNet", "2"]


def test_progress_bars_show_only_where_asked(model, x, capsys):
    for setting, shown in ((None, False), (True, True), (False, False)):  # pytest's stderr is no terminal
        with progress_bar(setting, "t") as bar:
            assert bar.disable is not shown
    capsys.readouterr()
    cf.occlusion(model, x[:1], 0, window=32, stride=32)
    cf.score_cam(model, x[:1], 0, "features.2")
    assert capsys.readouterr().err == ""
    cf.occlusion(model, x[:1], 0, window=32, stride=32, progress=True)
    cf.integrated_gradients(model, x[:1], 0, steps=2, progress=True)
    err = capsys.readouterr().err
    assert "occlusion: 100%" in err and "4/4" in err and "integrated_gradients: 100%" in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_load_image_gives_the_batch_the_methods_take(tmp_path, model, mode):
    from PIL import Image

    from cnnviz_fast.viz import load_image, overlay, save_image
    Image.new(mode, (80, 60), color=200 if mode == "L" else (200,) * len(mode)).save(tmp_path / "in.png")
    x = load_image(tmp_path / "in.png", size=64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 200 / 255))
    assert load_image(tmp_path / "in.png").shape == (1, 3, 60, 80)
    save_image(overlay(x, cf.grad_cam(model, x, None, "features"))[0], tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_occlusion_sweeps_never_reach_a_kernel(backend):
    if backend == "cpp" and not cf.backends()["cpp"]["available"]:
        pytest.skip("C++ extension not built")
    from cnnviz_fast import ops
    images = torch.rand(2, 3, 8, 8)
    none = torch.zeros(0, dtype=torch.long)
    out = ops.occlusion_copies(images, images, none, none.view(0, 2), 4, backend=backend)
    assert out.shape == (0, 3, 8, 8)
    sums, counts = torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8)
    ops.occlusion_scatter(torch.zeros(0), none, none.view(0, 2), 4, sums, counts, backend=backend)
    assert not sums.any() and not counts.any()
