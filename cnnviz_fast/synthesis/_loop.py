"""The optimization loop every synthesis method shares, its argument checks and its result."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from .._checks import check_number, pair
from .._hooks import capture, frozen_parameters
from ._image import PARAMETRIZATIONS, ImageParam, standard_transforms
from ._redirect import redirected_relus

TRANSFORMS = ("standard", None)


class Synthesis(NamedTuple):
    """Result of a synthesis method.

    images: float32 ``[N, 3, H, W]`` in [0, 1] on the model's device, one per objective (or
    per input image). trace: float32 ``[steps, N]``, per step and image the value the method
    reports before that step's update: the objective being maximized (class and feature
    visualization) or the loss being minimized (inversion, texture); ``[steps, N, 2]`` for
    style transfer (content loss, style loss).
    """

    images: torch.Tensor
    trace: torch.Tensor


def check_steps_lr(steps, lr) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")


def check_options(parametrization, transforms) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization: expected one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms: expected 'standard' or None, got {transforms!r}")


def check_weight(name, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def conv_output(layer, acts: torch.Tensor) -> torch.Tensor:
    if acts.dim() != 4:
        raise ValueError(f"layer: {layer!r} gives a {acts.dim()}-D output of shape {tuple(acts.shape)}; "
                         "expected a conv output [B, C, H, W]")
    return acts


@contextlib.contextmanager
def fixed_model(model: nn.Module):
    """The model in eval mode with frozen parameters for the block; every module's mode and
    every ``requires_grad`` flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with frozen_parameters(model):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def optimize(model: nn.Module, layers, loss_fn: Callable, *, n: int, size, steps: int, lr: float,
             parametrization: str, decorrelate: bool, transforms, preprocess, seed: int, init=None,
             blur_every=None, blur_sigma: float = 1.0, redirected_relu_steps: int = 0) -> Synthesis:
    """Adam on an :class:`ImageParam` of ``n`` images, all in one batch.

    ``loss_fn(record, output, image)`` gets the captured outputs of ``layers`` (dict), the
    model's output and the images in [0, 1] before transforms; it returns ``(loss [n],
    reported [n])``: the per-image losses are summed, so each image follows its own gradient
    and Adam (elementwise) treats them as independent runs (Lucent's ``render_vis`` per
    objective, Lucent's defaults: lr 0.05, sd 0.01). ``redirected_relu_steps``: the first steps
    that run the model's ``nn.ReLU`` modules with Lucid's redirected gradient (:mod:`._redirect`).
    """
    check_steps_lr(steps, lr)
    check_options(parametrization, transforms)
    size = pair("size", size)
    if blur_every is not None and (not isinstance(blur_every, int) or blur_every < 1):
        raise ValueError(f"blur_every: expected None or an int >= 1, got {blur_every!r}")
    if blur_every is not None and parametrization != "pixel":
        raise ValueError("blur_every: blurring applies to parametrization='pixel'")
    redirected_relu_steps = check_number("redirected_relu_steps", redirected_relu_steps, 0, integer=True)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    image = ImageParam(n, size, parametrization, decorrelate, generator, device, init=init)
    optimizer = torch.optim.Adam([image.param], lr=lr)
    trace = []
    step = 0
    # the redirection's hooks come before capture's, which then records the redirected outputs
    with fixed_model(model), redirected_relus(model, lambda: step < redirected_relu_steps), \
            capture(model, layers, detach=False) as record, torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            x = image()
            t = standard_transforms(x, generator) if transforms == "standard" else x
            output = model(preprocess(t) if preprocess is not None else t)
            loss, reported = loss_fn(record, output, x)
            loss.sum().backward()
            optimizer.step()
            trace.append(reported.detach().float())
            if blur_every is not None and (step + 1) % blur_every == 0:
                image.blur(blur_sigma)
    with torch.no_grad():
        return Synthesis(image().float(), torch.stack(trace))
