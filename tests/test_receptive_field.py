"""receptive_field: hand-worked golden values, published values of classic CNNs, and the
empirical field from gradients on every model of cnnviz_fast.models.

Empirical method: the model gets positive weights (uniform in [0.5, 1] / fan-in, BatchNorm
at its eval identity), an all-ones input and float64, so every activation is positive, no
ReLU blocks a gradient and no product underflows; each MaxPool2d is replaced by an AvgPool2d
with the same window (max-pool gradients reach one position per window only, hiding the
field; the window geometry, hence the field, is the same). The input gradient of one unit is
then nonzero exactly on its field clipped to the image; we compare the bounding rows and
columns for units (0, 0), the centre and the last one."""
import pytest
import torch
from torch import nn

from cnnviz_fast import models, receptive_field


class _Stop(Exception):
    pass


class Golden(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)            # size 3, jump 1, start -1
        self.pool = nn.MaxPool2d(2)                           # size 4, jump 2, start -1
        self.dilated = nn.Conv2d(2, 2, 3, padding=2, dilation=2)  # size 4 + 4*2 = 12, start -1 - 2*2 = -5
        self.short = nn.Conv2d(2, 2, 1)                       # size 4, start -1 (inside the dilated field)
        self.tail = nn.Conv2d(2, 2, (1, 3), stride=(1, 2))    # w: size 12 + 2*2 = 16, jump 4, start -5

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        y = self.dilated(x) + self.short(x)
        return self.tail(y)


def test_golden_hand_worked():
    net = Golden()
    rf = receptive_field(net, "dilated", 16)
    assert (rf.size, rf.jump, rf.offset, rf.feature_size) == ((12, 12), (2, 2), (-5, -5), (8, 8))
    rf = receptive_field(net, "tail", (16, 20))
    assert (rf.size, rf.jump, rf.offset, rf.feature_size) == ((12, 16), (2, 4), (-5, -5), (8, 4))
    assert rf.box(1, 2) == (-3, 3, 9, 19)
    assert tuple(net.tail(net.dilated(net.pool(net.conv1(torch.zeros(1, 1, 16, 20))))).shape[2:]) == (8, 4)


@pytest.mark.parametrize("name, layer, size, jump, offset", [
    ("alexnet", "features.12", 195, 32, -66),   # pool5
    ("alexnet", "features.10", 163, 16, -66),   # conv5
    ("vgg16", "features.29", 196, 16, -90),     # relu5_3
    ("vgg16", "features.30", 212, 32, -90),     # pool5
    ("resnet18", "layer4", 435, 32, -217),
    ("resnet50", "layer4", 427, 32, -213),
])
def test_published_values(name, layer, size, jump, offset):
    rf = receptive_field(getattr(models, name)(), layer, 224)
    assert (rf.size, rf.jump, rf.offset) == ((size, size), (jump, jump), (offset, offset))


def _positive_avgpool_double(model):
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1))
                setattr(m, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                     ceil_mode=child.ceil_mode, count_include_pad=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.uniform_(0.5, 1.0).div_(m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
    for m in model.modules():
        if not list(m.children()) and not isinstance(m, nn.Linear):  # the heads never run
            m.double()
    return model.eval()


def _empirical_boxes(model, layers, size):
    """{layer: [(unit, (top, bottom), (left, right)) inclusive]} from input gradients."""
    x = torch.ones(3, 3, size, size, dtype=torch.float64, requires_grad=True)
    outs = {}

    def hook(name):
        def fn(_m, _i, out):
            outs[name] = out
            if len(outs) == len(layers):
                raise _Stop
        return fn
    handles = [dict(model.named_modules())[n].register_forward_hook(hook(n)) for n in layers]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    boxes = {}
    for name, y in outs.items():
        h, w = y.shape[2:]
        units = [(0, 0), (h // 2, w // 2), (h - 1, w - 1)]
        score = sum(y[b, 0, i, j] for b, (i, j) in enumerate(units))
        (grad,) = torch.autograd.grad(score, x, retain_graph=True)
        nonzero = grad.abs().sum(1) > 0
        boxes[name] = []
        for b, unit in enumerate(units):
            rows, cols = nonzero[b].any(1).nonzero().flatten(), nonzero[b].any(0).nonzero().flatten()
            boxes[name].append((unit, (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))))
        boxes[name].append(("shape", tuple(y.shape[2:])))
    return boxes


MODELS = [
    ("alexnet", 96, ["features.2", "features.5", "features.12"]),
    ("vgg11", 32, ["features.2", "features.10", "features.20"]),
    ("vgg16", 32, ["features.16", "features.29"]),
    ("vgg16_bn", 32, ["features.6", "features.42"]),
    ("resnet18", 64, ["maxpool", "layer1", "layer2.0.downsample", "layer2", "layer4"]),
    ("resnet50", 48, ["layer1", "layer3.0.conv2", "layer3"]),
    ("shapes_cnn", 64, ["features.5", "features"]),
]


@pytest.mark.parametrize("name, size, layers", MODELS, ids=[m[0] for m in MODELS])
def test_matches_empirical_gradient_field(name, size, layers):
    torch.manual_seed(0)
    model = models.shapes_cnn(pretrained=False) if name == "shapes_cnn" else getattr(models, name)()
    fields = {layer: receptive_field(model, layer, size) for layer in layers}
    empirical = _empirical_boxes(_positive_avgpool_double(model), layers, size)
    for layer, rf in fields.items():
        *units, (_, shape) = empirical[layer]
        assert rf.feature_size == shape, f"{name} {layer}: feature size"
        for (i, j), rows, cols in units:
            top, left, bottom, right = rf.box(i, j)
            expected = ((max(top, 0), min(bottom, size) - 1), (max(left, 0), min(right, size) - 1))
            assert (rows, cols) == expected, f"{name} {layer} unit {(i, j)}: {rf}"


def test_layers_without_a_field_are_refused():
    net = models.resnet18()
    with pytest.raises(NotImplementedError, match="cannot follow"):
        receptive_field(net, "fc", 64)
    with pytest.raises(ValueError, match="called 2 times"):
        receptive_field(net, "layer1.0.relu", 64)
    with pytest.raises(ValueError, match="no module named"):
        receptive_field(net, "layer9", 64)
    with pytest.raises(NotImplementedError, match="unequal size"):
        receptive_field(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(3)), "1", 12)
    with pytest.raises(ValueError, match="input_size: too small"):
        receptive_field(nn.Sequential(nn.Conv2d(3, 2, 5)), "0", 4)
