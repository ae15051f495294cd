"""cnnviz_fast.compat.pytorch_grad_cam against pytorch-grad-cam 1.5.7: its README example and
segmentation / detection tutorials with only the imports changed, every class on the same calls
(targets, aug_smooth, eigen_smooth, several layers, reshape_transform), equal to 1e-5."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast.compat.pytorch_grad_cam as ours
from cnnviz_fast.data import shapes
from cnnviz_fast.models import resnet18, shapes_cnn
from tests._peers import import_pytorch_grad_cam

gcam = import_pytorch_grad_cam()
needs_peer = pytest.mark.skipif(gcam is None, reason="pytorch-grad-cam (with opencv-python-headless and ttach) "
                                                     "is not installed")
ATOL = 1e-5  # maps are in [0, 1]: 1e-5 of their range


def peer_targets():
    from pytorch_grad_cam.utils import model_targets
    return model_targets


def run_peer(cls, model, layers, x, targets, **kw):
    with getattr(gcam, cls)(model, layers, reshape_transform=kw.pop("reshape_transform", None)) as cam:
        return cam(x, targets=targets, **kw), cam.outputs


def assert_maps_equal(a, b, atol=ATOL):
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == b.shape, (type(a), a.shape, b.shape)
    err = np.abs(a - b)
    assert err.max() <= atol, f"max difference {err.max():.3e} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.fixture(scope="module")
def net():
    return shapes_cnn().eval()


@pytest.fixture(scope="module")
def images():
    return shapes(2, size=32, seed=3).images


# --------------------------------------------------------------------------- README example

@needs_peer
def test_readme_example():
    """pytorch-grad-cam's README with ``from cnnviz_fast.compat.pytorch_grad_cam import ...``."""
    from cnnviz_fast.compat.pytorch_grad_cam import ClassifierOutputTarget, GradCAM, show_cam_on_image
    torch.manual_seed(0)
    model = resnet18()
    target_layers = [model.layer4[-1]]
    input_tensor = torch.rand(1, 3, 64, 64)
    rgb_img = input_tensor[0].permute(1, 2, 0).numpy()
    with GradCAM(model=model, target_layers=target_layers) as cam:
        targets = [ClassifierOutputTarget(281)]
        grayscale_cam = cam(input_tensor=input_tensor, targets=targets)
        grayscale_cam = grayscale_cam[0, :]
        visualization = show_cam_on_image(rgb_img, grayscale_cam, use_rgb=True)
        model_outputs = cam.outputs
    peer, peer_outputs = run_peer("GradCAM", model, target_layers, input_tensor,
                                  [peer_targets().ClassifierOutputTarget(281)])
    assert_maps_equal(grayscale_cam, peer[0])
    from pytorch_grad_cam.utils.image import show_cam_on_image as peer_show
    assert visualization.dtype == np.uint8 and visualization.shape == (64, 64, 3)
    assert np.abs(visualization.astype(int) - peer_show(rgb_img, peer[0], use_rgb=True).astype(int)).max() <= 1
    assert torch.allclose(model_outputs, peer_outputs, atol=1e-5)


# --------------------------------------------------------------------------- every class

CLASSES = ["GradCAM", "GradCAMPlusPlus", "LayerCAM", "ScoreCAM", "EigenCAM"]


@needs_peer
@pytest.mark.parametrize("smooth", ["plain", "aug_smooth", "eigen_smooth"])
@pytest.mark.parametrize("targets", ["none", "class", "softmax"])
@pytest.mark.parametrize("cls", CLASSES)
def test_classes_match_pytorch_grad_cam(net, images, cls, targets, smooth):
    if (cls == "ScoreCAM" and smooth != "plain") or (targets == "softmax" and smooth != "plain"):
        pytest.skip("kept short: ScoreCAM runs 64 masked passes per image and view; smoothing is "
                    "covered by the other target kinds")
    kinds = {"none": (None, None),
             "class": ([ours.ClassifierOutputTarget(c) for c in (1, 4)],
                       [peer_targets().ClassifierOutputTarget(c) for c in (1, 4)]),
             "softmax": ([ours.ClassifierOutputSoftmaxTarget(c) for c in (2, 0)],
                         [peer_targets().ClassifierOutputSoftmaxTarget(c) for c in (2, 0)])}
    mine, theirs = kinds[targets]
    kw = {} if smooth == "plain" else {smooth: True}
    layers = [net.features]
    a = getattr(ours, cls)(net, layers)(images, targets=mine, **kw)
    b, _ = run_peer(cls, net, layers, images, theirs, **kw)
    assert_maps_equal(a, b)


@needs_peer
@pytest.mark.parametrize("cls", ["GradCAM", "LayerCAM"])
def test_several_layers(cls):
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    layers = [model.layer4[-1], model.layer3[-1]]
    a = getattr(ours, cls)(model, layers)(x, targets=[ours.ClassifierOutputTarget(3)] * 2)
    b, _ = run_peer(cls, model, layers, x, [peer_targets().ClassifierOutputTarget(3)] * 2)
    assert_maps_equal(a, b)


class TokenNet(nn.Module):
    """A transformer-like classifier: patch tokens [B, 16, 24] through a token-wise block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 8, stride=8)
        self.block = nn.Sequential(nn.Linear(24, 24), nn.GELU())
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.block(tokens).mean(1))


def tokens_to_map(t):
    """pytorch-grad-cam's ViT reshape_transform: [B, h*w, C] -> [B, C, h, w]."""
    return t.reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)


@needs_peer
@pytest.mark.parametrize("cls", ["GradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM"])
def test_reshape_transform(cls):
    torch.manual_seed(0)
    model = TokenNet().eval()
    x = torch.rand(2, 3, 32, 32)
    a = getattr(ours, cls)(model, [model.block], reshape_transform=tokens_to_map)(x)
    b, _ = run_peer(cls, model, [model.block], x, None, reshape_transform=tokens_to_map)
    assert_maps_equal(a, b)


def test_return_tensors_and_model_mode(net, images):
    net.train()
    try:
        cam = ours.GradCAM(net, [net.features])
        t = cam(images, targets=[ours.ClassifierOutputTarget(1)] * 2, return_tensors=True)
        assert net.training and all(m.training for m in net.modules())
    finally:
        net.eval()
    n = cam(images, targets=[ours.ClassifierOutputTarget(1)] * 2)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 32, 32)
    assert np.array_equal(t.numpy(), n) and 0 <= n.min() and n.max() <= 1


# --------------------------------------------------------------------------- segmentation and detection

class TinyFCN(nn.Module):
    """An FCN of the embedded default model: its features, its classifier as a 1x1 convolution
    (class scores per position, CAM's map), upsampled to the input; torchvision's dict output."""

    def __init__(self):
        super().__init__()
        base = shapes_cnn()
        self.backbone = base.features
        self.classifier = nn.Conv2d(base.fc.in_features, base.fc.out_features, 1)
        with torch.no_grad():
            self.classifier.weight.copy_(base.fc.weight[..., None, None])
            self.classifier.bias.copy_(base.fc.bias)

    def forward(self, x):
        return {"out": F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)}


class SegmentationModelOutputWrapper(nn.Module):
    """pytorch-grad-cam's segmentation tutorial wrapper."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@needs_peer
def test_semantic_segmentation_target():
    """The segmentation tutorial on the project's FCN: Grad-CAM of the class region of each
    image's predicted shape; the numbers are pytorch-grad-cam's and the map peaks on the shape."""
    model = SegmentationModelOutputWrapper(TinyFCN()).eval()
    data = shapes(4, size=64, seed=5)
    with torch.no_grad():
        output = model(data.images)
    targets, peer = [], []
    for i in range(4):
        category = int(data.labels[i])
        mask = np.float32(output[i].argmax(0).numpy() == category)
        targets.append(ours.SemanticSegmentationTarget(category, mask))
        peer.append(peer_targets().SemanticSegmentationTarget(category, mask))
    layers = [model.model.backbone]
    with ours.GradCAM(model=model, target_layers=layers) as cam:
        grayscale_cam = cam(input_tensor=data.images, targets=targets)
    b, _ = run_peer("GradCAM", model, layers, data.images, peer)
    assert_maps_equal(grayscale_cam, b)
    peaks = [data.masks[i].flatten()[int(np.argmax(grayscale_cam[i]))] for i in range(4)]
    assert sum(bool(p) for p in peaks) >= 3


class TinyDetector(nn.Module):
    """A torchvision-style detector output: per image, fixed candidate boxes whose scores come
    from the features under each box (differentiable), as a list of dicts."""

    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 60.0, 60.0], [8.0, 30.0, 40.0, 64.0]])

    def __init__(self):
        super().__init__()
        self.backbone = shapes_cnn().features
        self.score = nn.Conv2d(64, 1, 1)

    def forward(self, x):
        maps = self.score(self.backbone(x))[:, 0]
        stride = x.shape[-1] // maps.shape[-1]
        out = []
        for m in maps:
            scores = torch.stack([torch.sigmoid(m[int(y0) // stride:int(y1) // stride, int(x0) // stride:
                                                  int(x1) // stride].mean()) for x0, y0, x1, y1 in self.boxes])
            out.append({"boxes": self.boxes, "labels": torch.tensor([1, 2, 1]), "scores": scores})
        return out


@needs_peer
def test_faster_rcnn_box_score_target():
    torch.manual_seed(0)
    model = TinyDetector().eval()
    x = shapes(2, size=64, seed=2).images
    refs = (np.array([[2.0, 1.0, 30.0, 33.0]]), np.array([[15.0, 18.0, 58.0, 61.0]]))
    labels = ([1], [2])
    mine = [ours.FasterRCNNBoxScoreTarget(labels=lb, bounding_boxes=bb) for lb, bb in zip(labels, refs)]
    theirs = [peer_targets().FasterRCNNBoxScoreTarget(labels=lb, bounding_boxes=bb) for lb, bb in zip(labels, refs)]
    # the backbone's six batch norms run folded into their convolutions (cnnviz's CPU default),
    # float32 rounding apart from the original's order: 1.3e-5 of the map's scale seen here
    a = ours.EigenCAM(model, [model.backbone])(x, targets=mine)
    b, _ = run_peer("EigenCAM", model, [model.backbone], x, theirs)
    assert_maps_equal(a, b, atol=5e-5)
    a = ours.GradCAM(model, [model.backbone])(x, targets=mine)
    b, _ = run_peer("GradCAM", model, [model.backbone], x, theirs)
    assert_maps_equal(a, b, atol=5e-5)


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert torch.allclose(ours._box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))


# --------------------------------------------------------------------------- errors

def test_clear_errors(net, images):
    with pytest.raises(TypeError, match="target_layers"):
        ours.GradCAM(net, net.features)
    cam = ours.GradCAM(net, [net.features])
    with pytest.raises(ValueError, match="input_tensor"):
        cam(images[:, :, None])
    with pytest.raises(ValueError, match="targets"):
        cam(images, targets=[ours.ClassifierOutputTarget(1)])
    fcn = SegmentationModelOutputWrapper(TinyFCN()).eval()
    with pytest.raises(ValueError, match="targets: None"):
        ours.GradCAM(fcn, [fcn.model.backbone])(images)
