"""What input maximizes a class or a feature: regularized gradient ascent, all objectives of a
call in one batch (Lucent optimizes one objective per ``render_vis`` call)."""
from __future__ import annotations

import torch
from torch import nn

from .._hooks import resolve_layer
from ._loop import Synthesis, check_weight, conv_output, optimize


def _indices(name, values) -> list:
    items = [values] if isinstance(values, int) else values.tolist() if isinstance(values, torch.Tensor) else values
    if not isinstance(items, (list, tuple)) or not items or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name}: expected an int or a non-empty sequence of ints, got {values!r}")
    return list(items)


def _check_range(name, items, count, what):
    bad = [v for v in items if not 0 <= v < count]
    if bad:
        raise ValueError(f"{name}: {bad[0]} is out of range; expected 0..{count - 1} ({what})")


def _l2(image, weight):
    """Simonyan et al.'s L2 penalty per image, on pixels centred at mid-grey."""
    return weight * ((image - 0.5) ** 2).flatten(1).sum(1)


def class_visualization(model: nn.Module, classes, *, size=64, steps: int = 256, lr: float = 0.1,
                        parametrization: str = "fourier", decorrelate: bool = True, transforms="standard",
                        l2: float = 0.0, blur_every=None, blur_sigma: float = 1.0, preprocess=None,
                        seed: int = 0, redirected_relu_steps: int = 16) -> Synthesis:
    """Images that maximize class scores, by regularized gradient ascent on the input.

    model: any classifier returning logits ``[N, K]``; it is left unchanged (eval mode during
    the call, parameters frozen, modes and flags restored). classes: an int or a sequence of
    ints in ``[0, K)``, one image per entry, all optimized together in one batch.
    size: int or (H, W) of the images. Objective: the class logit, as Simonyan et al. 2014
    ("Deep Inside Convolutional Networks"; their L2 penalty ``l2 * ||x - 0.5||^2``) and
    Lucent's ``objectives.channel("labels", c)``. Regularizers: ``parametrization="fourier"``
    with ``decorrelate=True`` and ``transforms="standard"`` are Olah et al. 2017 / Lucent's
    ``param.image(size, fft=True, decorrelate=True)`` and ``transform.standard_transforms``;
    ``"pixel"`` is Lucent's ``fft=False``; ``blur_every=k`` blurs a pixel image every k steps
    (Yosinski et al. 2015; their clipping is implied: the sigmoid keeps pixels in (0, 1)).
    lr: Adam's learning rate (Lucent's optimizer is Adam with lr 0.05; at 0.05 the default
    model's circle class reached p = 0.36 after 256 steps with the standard transforms, at 0.1
    every class p >= 0.9 by 64 steps, hence the default here). preprocess: optional
    callable applied after the transforms (Lucent's ``preprocess``, e.g. ImageNet
    normalization); Lucent's upsampling of images below 224 px is not done. seed: the random
    initialization and transforms (the same seed as ``torch.manual_seed`` before Lucent's
    ``param.image`` gives the same initial parameters). redirected_relu_steps: for this many
    first steps the model's ``nn.ReLU`` modules pass the gradient of an image whose ReLU
    gradient is zero everywhere wherever it pushes towards activating (Lucid's
    ``redirected_relu_grad``, Olah et al. 2017, on by default in Lucid's ``render_vis`` as
    ``relu_gradient_override=True`` for its first 16 steps; Lucent has no such option, so 0
    reproduces Lucent). It changes nothing for an image whose gradient reaches every ReLU
    layer; it lets an objective that is dead on the start image move (at the default model's
    ``features.17``, 20 of 64 channels with pixel images at 32 px, no transforms). Done by
    hooks on the ``nn.ReLU`` modules, removed afterwards; functional ReLUs (``F.relu`` in a
    ``forward``) keep their ordinary gradient.
    Returns :class:`Synthesis` with images ``[N, 3, H, W]`` in [0, 1] and the trace of the
    logits ``[steps, N]``.
    """
    items = _indices("classes", classes)
    l2 = check_weight("l2", l2)
    target = None

    def loss_fn(_record, output, image):
        nonlocal target
        if output.dim() != 2:
            raise ValueError(f"model: expected logits [N, K], got an output of shape {tuple(output.shape)}")
        if target is None:
            _check_range("classes", items, output.shape[1], f"the model outputs {output.shape[1]} classes")
            target = torch.tensor(items, device=output.device)
        score = output.gather(1, target[:, None])[:, 0]
        return _l2(image, l2) - score, score

    return optimize(model, [], loss_fn, n=len(items), size=size, steps=steps, lr=lr,
                    parametrization=parametrization, decorrelate=decorrelate, transforms=transforms,
                    preprocess=preprocess, seed=seed, blur_every=blur_every, blur_sigma=blur_sigma,
                    redirected_relu_steps=redirected_relu_steps)


def feature_visualization(model: nn.Module, layer, channels=None, *, position=None, direction=None, size=64,
                          steps: int = 256, lr: float = 0.1, parametrization: str = "fourier",
                          decorrelate: bool = True, transforms="standard", l2: float = 0.0, blur_every=None,
                          blur_sigma: float = 1.0, preprocess=None, seed: int = 0,
                          redirected_relu_steps: int = 16) -> Synthesis:
    """Images that maximize features of a conv layer's output ``[N, C, h, w]``.

    Give exactly one of ``channels`` and ``direction``:
    channels: an int or a sequence of ints in ``[0, C)``, one image each. The objective is the
    channel's mean activation (Lucent's ``objectives.channel``), or with ``position`` the one
    neuron at ``(y, x)`` of the layer's output (Lucent's ``objectives.neuron``;
    ``position="center"`` is Lucent's default, ``(h // 2, w // 2)`` of the map actually
    computed, which the transforms enlarge). direction: ``[C]`` or ``[N, C]``, one image per
    row; the objective is the mean over positions of the cosine similarity between the
    direction and the activation vector (Lucent's ``objectives.direction``).
    layer: a module of the model or its dotted name, whose output is 4-D. Other arguments as
    :func:`class_visualization` (Olah et al. 2017; Lucent's parameters of the same meaning;
    ``redirected_relu_steps`` is Lucid's, see there).
    Returns :class:`Synthesis`: images ``[N, 3, H, W]`` and the objective's trace ``[steps, N]``.
    """
    resolve_layer(model, layer)
    if (channels is None) == (direction is None):
        raise ValueError("channels, direction: give exactly one of them")
    if direction is not None:
        if not isinstance(direction, torch.Tensor) or direction.dim() not in (1, 2) or \
                not direction.is_floating_point():
            raise TypeError("direction: expected a float tensor [C] or [N, C]")
        if position is not None:
            raise ValueError("position: applies to channels, not to a direction")
        rows = direction.reshape(-1, direction.shape[-1])
        items = None
    else:
        items = _indices("channels", channels)
        rows = None
    if position is not None and position != "center":
        if not (isinstance(position, (tuple, list)) and len(position) == 2 and
                all(isinstance(v, int) and v >= 0 for v in position)):
            raise ValueError(f"position: expected None, 'center' or (y, x) ints >= 0, got {position!r}")
    l2 = check_weight("l2", l2)
    checked = []

    def loss_fn(record, _output, image):
        acts = conv_output(layer, record[layer])
        C, h, w = acts.shape[1:]
        if not checked:
            if rows is not None and rows.shape[1] != C:
                raise ValueError(f"direction: expected {C} values per row (the layer's channels), got {rows.shape[1]}")
            if items is not None:
                _check_range("channels", items, C, f"layer {layer!r} has {C} channels")
            if isinstance(position, (tuple, list)) and not (position[0] < h and position[1] < w):
                raise ValueError(f"position: {tuple(position)} is outside the layer's {h}x{w} output")
            checked.append(True)
        if rows is not None:
            objective = torch.cosine_similarity(rows.to(acts)[:, :, None, None], acts, dim=1).flatten(1).mean(1)
        else:
            picked = acts[torch.arange(len(items), device=acts.device), torch.tensor(items, device=acts.device)]
            if position is None:
                objective = picked.flatten(1).mean(1)
            else:
                y, x = (h // 2, w // 2) if position == "center" else position
                objective = picked[:, y, x]
        return _l2(image, l2) - objective, objective

    n = len(items) if items is not None else rows.shape[0]
    return optimize(model, [layer], loss_fn, n=n, size=size, steps=steps, lr=lr, parametrization=parametrization,
                    decorrelate=decorrelate, transforms=transforms, preprocess=preprocess, seed=seed,
                    blur_every=blur_every, blur_sigma=blur_sigma, redirected_relu_steps=redirected_relu_steps)
