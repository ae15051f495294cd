"""The Gram-matrix methods of Gatys et al.: texture synthesis and style transfer."""
from __future__ import annotations

import torch
from torch import nn

from .._hooks import resolve_layer
from ..ops import gram
from ._loop import Synthesis, check_weight, conv_output, optimize
from .inversion import check_images, layer_features

INITS = ("content", "random")


def _layer_list(name, layers) -> list:
    items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers) if isinstance(layers, (list, tuple)) else None
    if not items:
        raise TypeError(f"{name}: expected a layer or a non-empty list of layers, got {layers!r}")
    return items


def _style_targets(model, images, layers, preprocess) -> dict:
    feats = layer_features(model, images, layers, preprocess)
    return {k: gram(conv_output(k, feats[k])) for k in layers}


def gram_loss(record: dict, targets: dict) -> torch.Tensor:
    """Per image, the sum over layers of the squared Frobenius distance between the Gram
    matrices (:func:`cnnviz_fast.gram`) of the recorded outputs and the targets ``[1 or N, C, C]``."""
    return sum((gram(conv_output(k, record[k])) - g).flatten(1).pow(2).sum(1) for k, g in targets.items())


def texture_synthesis(model: nn.Module, texture: torch.Tensor, layers, *, size=None, steps: int = 200,
                      lr: float = 0.05, parametrization: str = "pixel", decorrelate: bool = False, transforms=None,
                      preprocess=None, seed: int = 0) -> Synthesis:
    """New images with the textures' Gram matrices (Gatys et al. 2015, "Texture Synthesis Using
    Convolutional Neural Networks"), one per texture, all in one batch.

    texture: float ``[N, 3, H, W]`` in [0, 1] on the model's device. layers: one layer or a
    list (modules or dotted names) with 4-D outputs. size: of the synthesized images (default
    the textures'). Loss per image: ``sum_l ||G_l(x') - G_l(texture)||_F^2`` with ``G`` the
    Gram matrix normalized by ``C * H * W`` (:func:`cnnviz_fast.gram`; the paper weights
    layers by ``1 / (4 N_l^2 M_l^2)`` instead), minimized with Adam from a random image (the
    paper used L-BFGS). Returns :class:`Synthesis` with the Gram-loss trace ``[steps, N]``.
    """
    check_images("texture", texture, model)
    layers = _layer_list("layers", layers)
    for k in layers:
        resolve_layer(model, k)
    targets = _style_targets(model, texture, layers, preprocess)

    def loss_fn(record, _output, _image):
        loss = gram_loss(record, targets)
        return loss, loss

    return optimize(model, layers, loss_fn, n=texture.shape[0], size=size or tuple(texture.shape[2:]), steps=steps,
                    lr=lr, parametrization=parametrization, decorrelate=decorrelate, transforms=transforms,
                    preprocess=preprocess, seed=seed)


def style_transfer(model: nn.Module, content: torch.Tensor, style: torch.Tensor, *, content_layer, style_layers,
                   style_weight: float = 100.0, content_weight: float = 1.0, init: str = "random", steps: int = 200,
                   lr: float = 0.05, parametrization: str = "pixel", decorrelate: bool = False, preprocess=None,
                   seed: int = 0) -> Synthesis:
    """The content images painted in the style images' Gram statistics (Gatys et al. 2016,
    "Image Style Transfer Using Convolutional Neural Networks"), batched over content images.

    content: float ``[N, 3, H, W]``, style: ``[1 or N, 3, Hs, Ws]``, both in [0, 1] on the
    model's device. content_layer: one layer with a 4-D output; style_layers: one or a list.
    Loss per image: ``content_weight * mean((F(x') - F(content))^2) + style_weight *
    sum_l ||G_l(x') - G_l(style)||_F^2`` (Gram matrices as :func:`cnnviz_fast.gram`, normalized
    by ``C * H * W``), minimized with Adam from a random image (``init="random"``, as the
    paper's white noise) or from the content image (``"content"``). Returns :class:`Synthesis` whose trace
    is ``[steps, N, 2]``: per step and image the content loss and the style loss (unweighted).
    """
    check_images("content", content, model)
    check_images("style", style, model)
    if style.shape[0] not in (1, content.shape[0]):
        raise ValueError(f"style: expected 1 or {content.shape[0]} images (one per content image), got {style.shape[0]}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    resolve_layer(model, content_layer)
    style_layers = _layer_list("style_layers", style_layers)
    for k in style_layers:
        resolve_layer(model, k)
    style_weight = check_weight("style_weight", style_weight)
    content_weight = check_weight("content_weight", content_weight)
    targets = _style_targets(model, style, style_layers, preprocess)
    content_target = conv_output(content_layer, layer_features(model, content, content_layer, preprocess)[content_layer])

    def loss_fn(record, _output, _image):
        content_loss = (record[content_layer] - content_target).flatten(1).pow(2).mean(1)
        style_loss = gram_loss(record, targets)
        return content_weight * content_loss + style_weight * style_loss, torch.stack([content_loss, style_loss], 1)

    layers = list(dict.fromkeys([content_layer, *style_layers]))
    return optimize(model, layers, loss_fn, n=content.shape[0], size=tuple(content.shape[2:]), steps=steps, lr=lr,
                    parametrization=parametrization, decorrelate=decorrelate, transforms=None,
                    preprocess=preprocess, seed=seed, init=content if init == "content" else None)
