"""Lucid's redirected ReLU gradient (Olah et al. 2017; Lucid's ``redirected_relu_grad``, on
with ``render_vis(relu_gradient_override=True)``, its default, for the first 16 steps): a
channel whose ReLU is off everywhere on the start image gets no gradient and never moves; for
such an image the gradient is passed through the ReLU wherever it pushes towards activating.
Lucent has no counterpart."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


class _RedirectedReLU(torch.autograd.Function):
    """``relu(x)``; backward: the ordinary ReLU gradient for an image where it is non-zero
    somewhere, else the incoming gradient except where it would push a negative input further
    down (Lucid: ``where(x < 0 and grad > 0, 0, grad)``, ``grad`` of the loss minimized)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ordinary = torch.ops.aten.threshold_backward(grad, x, 0)  # torch's own ReLU gradient
        dead = ~ordinary.reshape(len(x), -1).any(1)  # per image, as Lucid's norm == 0
        if not bool(dead.any()):  # the usual case, nothing to redirect (one sync per ReLU on a GPU)
            return ordinary
        redirected = grad.masked_fill((x < 0) & (grad > 0), 0)
        return torch.where(dead.view(-1, *[1] * (x.dim() - 1)), redirected, ordinary)


@contextlib.contextmanager
def redirected_relus(model: nn.Module, active: Callable[[], bool]):
    """Every ``nn.ReLU`` module of ``model`` computes :class:`_RedirectedReLU` instead while
    ``active()``, by hooks removed on exit (the model itself is not changed). Enter it before
    any hook that records ReLU outputs, so that the record is the redirected tensor. Functional
    ReLUs (``F.relu``, ``torch.relu`` in a ``forward``) have no module to hook and keep their
    ordinary gradient."""
    inputs_before = {}

    def pre_hook(module, inputs):
        if active() and inputs[0].dim() > 0:  # dim 0 is the batch, as in Lucid
            # an in-place ReLU overwrites its input: keep the values before it
            inputs_before[module] = inputs[0].clone() if module.inplace else inputs[0]

    def hook(module, _inputs, _output):
        x = inputs_before.pop(module, None)
        return None if x is None else _RedirectedReLU.apply(x)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_pre_hook(pre_hook) for m in relus] + [m.register_forward_hook(hook) for m in relus]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
