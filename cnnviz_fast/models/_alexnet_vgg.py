"""AlexNet and VGG matching torchvision's module names, state_dict keys and init.

Checkpoints for ``torchvision.models.alexnet`` / ``vgg11`` / ``vgg16`` / ``vgg16_bn``
load unchanged (torchvision 0.13+ layout: adaptive pooling before the classifier).
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels per 3x3 conv, "M" = 2x2 max pool (Simonyan & Zisserman 2015, Table 1).
_VGG_CONFIGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012, one-GPU variant) as in torchvision.

    Input float32 [B, 3, H, W] (224x224 nominal), output logits [B, num_classes].
    Keeps torchvision's default PyTorch initialisation.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2015) as in torchvision: ``features`` from a config,
    ``avgpool`` AdaptiveAvgPool2d((7, 7)), ``classifier`` with two dropout layers.

    Input float32 [B, 3, H, W], output logits [B, num_classes]. Init as torchvision:
    conv kaiming-normal (fan_out, relu), BN weight 1 / bias 0, linear N(0, 0.01), biases 0.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg_features(config: str, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in _VGG_CONFIGS[config]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


def alexnet(num_classes: int = 1000, **kw) -> AlexNet:
    """torchvision-compatible AlexNet, random init (61,100,840 params at 1000 classes)."""
    return AlexNet(num_classes=num_classes, **kw)


def vgg11(num_classes: int = 1000, **kw) -> VGG:
    """torchvision-compatible VGG-11 (config A), random init (132,863,336 params)."""
    return VGG(_vgg_features("A", batch_norm=False), num_classes=num_classes, **kw)


def vgg16(num_classes: int = 1000, **kw) -> VGG:
    """torchvision-compatible VGG-16 (config D), random init (138,357,544 params)."""
    return VGG(_vgg_features("D", batch_norm=False), num_classes=num_classes, **kw)


def vgg16_bn(num_classes: int = 1000, **kw) -> VGG:
    """torchvision-compatible VGG-16 with batch norm, random init (138,365,992 params)."""
    return VGG(_vgg_features("D", batch_norm=True), num_classes=num_classes, **kw)
