"""The embedded default model: a small CAM-ready CNN trained on ``cnnviz_fast.data.shapes``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data import SHAPE_CLASSES

# Module whose output (last block, after its in-place ReLU; [B, 64, 16, 16] at 64 px)
# feeds global average pooling: the layer CAM / Grad-CAM should hook.
SHAPES_CNN_CAM_LAYER = "features"
SHAPES_CNN_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "shapes_cnn.pt"


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ShapesCNN(nn.Module):
    """Conv-BN-ReLU stack, two stride-2 convs (64 px -> 16x16 map), GAP, linear head.

    The GAP + single linear layer is the architecture CAM needs (Zhou et al. 2016,
    "Learning Deep Features for Discriminative Localization"). A final dilated conv
    widens the receptive field (~37 px) to cover the largest shapes at 16x16 resolution.
    Input float32 [B, 3, H, W] in [0, 1] (trained at 64x64), output logits
    [B, len(class_names)]. ``class_names`` lists the label order.
    """

    def __init__(self, class_names: tuple[str, ...] = SHAPE_CLASSES, width: int = 64):
        super().__init__()
        self.class_names = tuple(class_names)
        half = width // 2
        self.features = nn.Sequential(
            *_conv_bn_relu(3, half // 2),
            *_conv_bn_relu(half // 2, half, stride=2),
            *_conv_bn_relu(half, half),
            *_conv_bn_relu(half, width, stride=2),
            *_conv_bn_relu(width, width),
            *_conv_bn_relu(width, width, dilation=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, len(self.class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def shapes_cnn(pretrained: bool = True) -> ShapesCNN:
    """The default model for ``cnnviz_fast.data.shapes`` images (64x64, classes in
    ``SHAPE_CLASSES`` order), in eval mode. ``pretrained`` loads the shipped weights
    ``cnnviz_fast/weights/shapes_cnn.pt`` (see ``shapes_cnn.md`` there); otherwise the
    init is random from the caller's torch RNG."""
    model = ShapesCNN()
    if pretrained:
        model.load_state_dict(torch.load(SHAPES_CNN_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()
