"""Model zoo: torchvision-identical architectures and the shipped default model."""

import pytest
import torch

from cnnviz_fast import models
from cnnviz_fast.data import shapes
from cnnviz_fast.models import train_shapes

# Parameter counts and a sample of state_dict keys of torchvision 0.2x's models.
TORCHVISION = {
    "alexnet": (61_100_840, ["features.0.weight", "features.10.bias", "classifier.1.weight", "classifier.6.bias"]),
    "vgg11": (132_863_336, ["features.0.weight", "features.18.bias", "classifier.6.weight"]),
    "vgg16": (138_357_544, ["features.28.weight", "classifier.0.weight", "classifier.3.bias"]),
    "vgg16_bn": (138_365_992, ["features.1.running_mean", "features.41.num_batches_tracked", "features.40.weight"]),
    "resnet18": (11_689_512, ["conv1.weight", "bn1.running_var", "layer2.0.downsample.1.weight", "layer4.1.bn2.bias", "fc.weight"]),
    "resnet50": (25_557_032, ["layer1.0.conv3.weight", "layer3.5.bn3.running_mean", "layer4.0.downsample.0.weight", "fc.bias"]),
}


@pytest.fixture(scope="module", params=sorted(TORCHVISION))
def zoo_model(request):
    torch.manual_seed(0)
    return request.param, getattr(models, request.param)()


def test_zoo_matches_torchvision_layout(zoo_model):
    name, model = zoo_model
    count, keys = TORCHVISION[name]
    assert sum(p.numel() for p in model.parameters()) == count
    state = model.state_dict()
    missing = [k for k in keys if k not in state]
    assert not missing, f"{name}: state_dict lacks {missing}"
    # A checkpoint saved from the same layout loads strictly.
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


def test_zoo_forward_shape(zoo_model):
    name, model = zoo_model
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, 64 if name != "alexnet" else 96, 64 if name != "alexnet" else 96))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_shapes_cnn_shipped_weights():
    assert models.SHAPES_CNN_WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    model = models.shapes_cnn()
    assert not model.training
    held_out = shapes(1000, seed=train_shapes.HELD_OUT_SEED)
    accuracy = train_shapes.accuracy(model, held_out.images, held_out.labels)
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f} < 0.95"
    assert model.class_names == held_out.class_names
    layer = models.SHAPES_CNN_CAM_LAYER
    assert isinstance(dict(model.named_modules())[layer], torch.nn.Sequential)


def test_shapes_cnn_random_init_differs():
    torch.manual_seed(1)
    model = models.shapes_cnn(pretrained=False)
    shipped = models.shapes_cnn().state_dict()
    assert not torch.equal(model.fc.weight, shipped["fc.weight"])


def test_training_script_runs_and_writes_atomically(tmp_path):
    out = tmp_path / "w.pt"
    accuracy = train_shapes.main(["--out", str(out), "--epochs", "1", "--n-train", "128", "--n-held-out", "32"])
    assert 0.0 <= accuracy <= 1.0
    state = torch.load(out, weights_only=True)
    models.shapes_cnn(pretrained=False).load_state_dict(state)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temp file left behind


def test_training_script_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        train_shapes.parse_args(["--epochs", "0"])
