"""What an activation remembers of its image: feature inversion with a total variation prior."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_tensor
from .._hooks import capture, resolve_layer
from ._loop import Synthesis, check_weight, conv_output, fixed_model, model_device, optimize


def total_variation(images: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mahendran & Vedaldi's ``TV^beta`` per image: the mean over pixels and channels of
    ``((x[i, j+1] - x[i, j])^2 + (x[i+1, j] - x[i, j])^2)^(beta / 2)`` (a mean, not their sum,
    so weights do not depend on the size). images ``[N, C, H, W]`` -> ``[N]``."""
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]
    return (dx * dx + dy * dy).pow(beta / 2).flatten(1).mean(1)


def layer_features(model: nn.Module, x: torch.Tensor, layers, preprocess=None) -> dict:
    """The outputs of ``layers`` for ``x``, the model in eval mode and left as found."""
    with fixed_model(model), capture(model, layers) as record, torch.no_grad():
        model(preprocess(x) if preprocess is not None else x)
    return dict(record)


def check_images(name, x, model) -> torch.Tensor:
    check_tensor(name, x, ndim=4)
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected RGB images [N, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"{name}: expected at least one image of size >= 1, got shape {tuple(x.shape)}")
    if x.device != model_device(model):
        raise ValueError(f"{name}: is on {x.device} but the model's parameters are on {model_device(model)}")
    return x


def feature_inversion(model: nn.Module, x: torch.Tensor, layer, *, tv_weight: float = 0.05, tv_beta: float = 2.0,
                      steps: int = 200, lr: float = 0.05, parametrization: str = "pixel", decorrelate: bool = False,
                      transforms=None, preprocess=None, seed: int = 0) -> Synthesis:
    """Images whose activations at ``layer`` match those of ``x`` (Mahendran & Vedaldi 2015,
    "Understanding Deep Image Representations by Inverting Them"), batched over images.

    x: float ``[N, 3, H, W]`` in [0, 1] on the model's device. layer: a module or dotted name
    with a 4-D output. Per image the loss is ``||phi(x') - phi(x)||^2 / ||phi(x)||^2 +
    tv_weight * TV^tv_beta(x')`` (see :func:`total_variation`), minimized with Adam (lr) from
    a random image of the given parametrization (default: pixels through a sigmoid, which
    keeps them in (0, 1) as the paper's bounded range). Returns :class:`Synthesis`: the
    reconstructions ``[N, 3, H, W]`` and the loss trace ``[steps, N]``.
    """
    check_images("x", x, model)
    resolve_layer(model, layer)
    tv_weight = check_weight("tv_weight", tv_weight)
    tv_beta = check_weight("tv_beta", tv_beta)
    target = conv_output(layer, layer_features(model, x, layer, preprocess)[layer])
    norm = target.flatten(1).pow(2).sum(1).clamp_min(torch.finfo(target.dtype).tiny)

    def loss_fn(record, _output, image):
        error = (record[layer] - target).flatten(1).pow(2).sum(1) / norm
        loss = error + tv_weight * total_variation(image, tv_beta) if tv_weight else error
        return loss, loss

    return optimize(model, [layer], loss_fn, n=x.shape[0], size=tuple(x.shape[2:]), steps=steps, lr=lr,
                    parametrization=parametrization, decorrelate=decorrelate, transforms=transforms,
                    preprocess=preprocess, seed=seed)
