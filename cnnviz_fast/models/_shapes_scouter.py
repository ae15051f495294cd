"""SCOUTER+ / SCOUTER- heads on the embedded default model's backbone, for ``cnnviz_fast.data.shapes``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import SHAPE_CLASSES
from ..explain.scouter import ScouterHead, ScouterModel, scouter_model
from ._shapes_cnn import shapes_cnn

_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Head settings of the shipped weights (train_scouter's defaults); hidden_dim 64, three slots per
# class and a three-layer key MLP as the authors' negative CUB-200 / ConText runs (slots_per_class
# 3, to_k_layer 3): against one slot and one layer they lifted SCOUTER-'s true-class-least share
# from 99.0% to 100% and the circle maps peaking in a ring's hole from 1% to 16% (README).
SHAPES_SCOUTER_HEAD = {"slots_per_class": 3, "iters": 3, "hidden_dim": 64, "lambda_area": 10.0, "area_power": 2.0,
                       "key_layers": 3}


def shapes_scouter_weights(positive: bool) -> Path:
    """Path of the shipped head weights of SCOUTER+ (``positive=True``) or SCOUTER-."""
    return _WEIGHTS_DIR / f"shapes_scouter_{'positive' if positive else 'negative'}.pt"


def shapes_scouter_head(positive: bool = True, **overrides) -> ScouterHead:
    """A fresh (random) head for the default backbone's 64-channel 16x16 feature map."""
    return ScouterHead(64, len(SHAPE_CLASSES), positive=positive, **{**SHAPES_SCOUTER_HEAD, **overrides})


def shapes_scouter(positive: bool = True, pretrained: bool = True) -> ScouterModel:
    """``shapes_cnn()``'s convolutional body (its shipped weights, frozen in training) with a
    SCOUTER+ (``positive=True``) or SCOUTER- head, in eval mode; 64x64 inputs, classes in
    ``SHAPE_CLASSES`` order. ``pretrained`` loads the shipped head weights
    (``python -m cnnviz_fast.models.train_scouter``; figures in README.md); otherwise the head
    is random from the caller's torch RNG."""
    model = scouter_model(shapes_cnn().features, shapes_scouter_head(positive))
    if pretrained:
        state = torch.load(shapes_scouter_weights(positive), map_location="cpu", weights_only=True)
        model.head.load_state_dict(state)
    return model.eval()
