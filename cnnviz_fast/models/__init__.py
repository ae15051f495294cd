"""Model zoo: torchvision-compatible architectures (random init, no downloads) and the
embedded ``shapes_cnn`` default model."""

from ._alexnet_vgg import VGG, AlexNet, alexnet, vgg11, vgg16, vgg16_bn
from ._resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from ._shapes_cnn import SHAPES_CNN_CAM_LAYER, SHAPES_CNN_WEIGHTS, ShapesCNN, shapes_cnn
from ._shapes_scouter import SHAPES_SCOUTER_HEAD, shapes_scouter, shapes_scouter_head, shapes_scouter_weights

__all__ = [
    "AlexNet",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ShapesCNN",
    "alexnet",
    "vgg11",
    "vgg16",
    "vgg16_bn",
    "resnet18",
    "resnet50",
    "shapes_cnn",
    "SHAPES_CNN_CAM_LAYER",
    "SHAPES_CNN_WEIGHTS",
    "shapes_scouter",
    "shapes_scouter_head",
    "shapes_scouter_weights",
    "SHAPES_SCOUTER_HEAD",
]
