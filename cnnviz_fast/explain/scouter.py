"""SCOUTER: a slot-attention classifier whose attention explains why (and why not) a class.

Li, Wang, Nakashima, Nagahara, Lin: "SCOUTER: Slot Attention-based Classifier for Explainable
Image Recognition", ICCV 2021; matched to the authors' code (github.com/wbw520/scouter,
``sloter/utils/slot_attention.py``, ``sloter/slot_model.py``, ``position_encode.py``).

The xSlot head replaces a backbone's pooling + linear classifier. A 1x1 conv (+ ReLU) maps the
backbone's feature map ``[B, C, h, w]`` to ``hidden_dim`` channels (the values ``v``); a DETR
sine positional embedding is added and a linear layer (an MLP for ``key_layers`` > 1) makes
the keys ``k``. Learnt slots, ``slots_per_class`` per class, attend to the positions for ``iters`` rounds: dot products
scaled by ``hidden_dim ** -0.5``, a sigmoid (not a softmax: slots do not compete), the
weighted values update the slots through a GRU. A class's score is the sum over its slots and positions of
``attention * mean_channel(v)``; SCOUTER+ (``positive=True``) uses it as the logit (attention
marks evidence *for* the class), SCOUTER- negates it (attention marks evidence *against*: the
predicted class is the one with the least). The area loss
``lambda_area * mean(attention) ** area_power`` keeps explanations small.

Differences from the authors' code, all documented choices. Their code rescales the dot
products before the sigmoid, ``dots / dots.sum(positions) * dots.sum(slots and positions)``
(each slot's row divided by its own sum, which at initialisation can be near zero or negative);
on the shapes backbone's features that saturated the sigmoid and training stalled (held-out
accuracy 67% for SCOUTER+ and 17% for SCOUTER- after 5 epochs on 4,000 images at lr 1e-3;
SCOUTER+ 32% on 2,000 at their lr 1e-4), against 99.7% and 99.9% without it (2,000 images,
lr 1e-3), so the plain scaled dot product is used. The GRU is ``nn.GRUCell`` (their
one-step ``nn.GRU`` over ``B * slots`` rows is the same computation); the initial slots are
``mu + |sigma| * N(0, 1)`` (their ``torch.normal(mu, sigma)`` with a signed sigma raises in
current PyTorch); the positional embedding is computed for the feature map's size instead of
their fixed 9x9 reshape; their unused ``to_q`` layer and visualisation side effects are left
out; the per-class slot sums are one reshape, not a Python loop. The paper writes the area loss
as ``lambda * sum(attention)``; the code (followed here) uses the mean over batch, slots and
positions raised to ``power`` (default 2), which is the same up to the scale of lambda when the
power is 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_input, check_number, check_tensor
from .._hooks import explanation
from .._targets import target_indices
from ..ops import upsample_normalize

# DETR's sine embedding constants, as the authors' build_position_encoding("sine") sets them.
_PE_TEMPERATURE = 10000.0
_PE_EPS = 1e-6


def _check_count(name: str, value) -> int:
    return check_number(name, value, 1, integer=True)


def _sine_position_embedding(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding ``[dim, h, w]``: first half encodes y, second x;
    within each half, channels alternate sin / cos at geometric frequencies."""
    feats = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + _PE_EPS) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + _PE_EPS) * 2 * math.pi
    freq = _PE_TEMPERATURE ** (2 * (torch.arange(feats, device=device) // 2) / feats)

    def encode(pos):  # [n] -> [n, feats], sin on even channels, cos on odd
        angles = pos[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, feats)
    pos_x = encode(x)[None, :, :].expand(h, w, feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)


class ScouterHead(nn.Module):
    """The xSlot classification head of SCOUTER (Li et al., ICCV 2021).

    in_channels: channels ``C`` of the backbone's feature map. num_classes, slots_per_class:
    ints >= 1. iters: slot-attention rounds (>= 1). hidden_dim: channels of values, keys and
    slots (a multiple of 4, for the sine embedding). positive: SCOUTER+ (True) or SCOUTER-
    (False). lambda_area, area_power: the area loss ``lambda_area * mean(attention) **
    area_power`` (authors' defaults 1 and 2). key_layers: linear layers of the key MLP, ReLUs
    between (the authors' ``to_k_layer``; 1 is one linear layer).

    ``forward(features [B, C, h, w]) -> logits [B, num_classes]``; ``attend`` also returns the
    slots' attention ``[B, num_classes * slots_per_class, h, w]`` in (0, 1); ``class_attention``
    sums it per class. Float tensors on the parameters' device.
    """

    def __init__(self, in_channels: int, num_classes: int, *, slots_per_class: int = 1, iters: int = 3,
                 hidden_dim: int = 64, positive: bool = True, lambda_area: float = 1.0, area_power: float = 2.0,
                 key_layers: int = 1):
        super().__init__()
        _check_count("in_channels", in_channels)
        _check_count("num_classes", num_classes)
        _check_count("slots_per_class", slots_per_class)
        _check_count("iters", iters)
        _check_count("key_layers", key_layers)
        if _check_count("hidden_dim", hidden_dim) % 4:
            raise ValueError(f"hidden_dim: expected a multiple of 4 (sine embedding halves), got {hidden_dim}")
        if lambda_area < 0:
            raise ValueError(f"lambda_area: expected >= 0, got {lambda_area}")
        self.in_channels, self.num_classes, self.slots_per_class = in_channels, num_classes, slots_per_class
        self.iters, self.hidden_dim, self.positive = iters, hidden_dim, bool(positive)
        self.lambda_area, self.area_power, self.key_layers = float(lambda_area), float(area_power), key_layers
        self.project = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        mu, sigma = torch.randn(1, 1, hidden_dim), torch.randn(1, 1, hidden_dim).abs()
        self.initial_slots = nn.Parameter(mu + sigma * torch.randn(1, num_classes * slots_per_class, hidden_dim))
        # The authors' to_k_layer: Linear, then (ReLU, Linear) for each further layer.
        self.to_k = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), *[
            m for _ in range(key_layers - 1) for m in (nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))])
        self.gru = nn.GRUCell(hidden_dim, hidden_dim)

    def extra_repr(self) -> str:
        return (f"slots_per_class={self.slots_per_class}, iters={self.iters}, positive={self.positive}, "
                f"lambda_area={self.lambda_area}, area_power={self.area_power}, key_layers={self.key_layers}")

    def attend(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, num_classes], attention [B, num_classes * slots_per_class, h, w])``:
        the last round's sigmoid attention, which also forms the logits (as in the paper)."""
        check_tensor("features", features, ndim=4)
        if features.shape[1] != self.in_channels:
            raise ValueError(f"features: expected {self.in_channels} channels, got shape {tuple(features.shape)}")
        b, _, h, w = features.shape
        v = torch.relu(self.project(features))
        pe = _sine_position_embedding(h, w, self.hidden_dim, v.device, v.dtype)
        k = self.to_k((v + pe).flatten(2).transpose(1, 2))  # [B, n, d]
        v = v.flatten(2).transpose(1, 2)  # values carry no positional embedding
        slots = self.initial_slots.expand(b, -1, -1)
        scale = self.hidden_dim ** -0.5
        for _ in range(self.iters):  # rounds depend on each other; everything else is batched
            dots = torch.einsum("bsd,bnd->bsn", slots, k) * scale
            attn = torch.sigmoid(dots)
            updates = torch.einsum("bsn,bnd->bsd", attn, v) / self.hidden_dim
            slots = self.gru(updates.reshape(-1, self.hidden_dim),
                             slots.reshape(-1, self.hidden_dim)).view(b, -1, self.hidden_dim)
        evidence = updates.sum(2).view(b, self.num_classes, self.slots_per_class).sum(2)
        return (evidence if self.positive else -evidence), attn.view(b, -1, h, w)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.attend(features)[0]

    def class_attention(self, attention: torch.Tensor) -> torch.Tensor:
        """Slots' attention ``[B, num_classes * slots_per_class, h, w]`` -> per class ``[B, num_classes, h, w]``."""
        b, _, h, w = attention.shape
        return attention.view(b, self.num_classes, self.slots_per_class, h, w).sum(2)

    def area_loss(self, attention: torch.Tensor) -> torch.Tensor:
        """``lambda_area * mean(attention) ** area_power`` (the authors' ``slot_loss``)."""
        return self.lambda_area * attention.mean() ** self.area_power


class ScouterModel(nn.Module):
    """``backbone`` (image ``[B, 3, H, W]`` -> feature map ``[B, C, h, w]``) followed by a
    ``ScouterHead``; ``forward(x) -> logits``, ``attend(x) -> (logits, slot attention)``."""

    def __init__(self, backbone: nn.Module, head: ScouterHead):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone: expected an nn.Module, got {type(backbone).__name__}")
        if not isinstance(head, ScouterHead):
            raise TypeError(f"head: expected a ScouterHead, got {type(head).__name__}")
        self.backbone, self.head = backbone, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        features = self.backbone(x)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"backbone: expected a 4-D feature map [B, C, h, w], got {got}")
        return features

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.attend(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def scouter_model(backbone: nn.Module, head: ScouterHead) -> ScouterModel:
    """A classifier made of ``backbone`` (-> 4-D feature map) and a ``ScouterHead``."""
    return ScouterModel(backbone, head)


def has_scouter_head(model: nn.Module) -> bool:
    """Whether ``model`` contains a ``ScouterHead`` (so ``scouter_explain`` applies to it)."""
    return any(isinstance(m, ScouterHead) for m in model.modules())


def _the_head(model: nn.Module) -> ScouterHead:
    heads = [m for m in model.modules() if isinstance(m, ScouterHead)]
    if len(heads) != 1:
        raise ValueError(f"model: expected exactly one ScouterHead, found {len(heads)}")
    return heads[0]


@explanation(target=False)  # checks x, explains in eval mode (warning about a training-mode model)
def scouter_explain(model: nn.Module, x: torch.Tensor, target=None, *, size="input",
                    normalize: bool = True) -> torch.Tensor:
    """SCOUTER's explanation: the attention of the classes' slots (summed per class), resized
    with ``upsample_normalize``.

    model: any module containing one ``ScouterHead`` (e.g. from ``scouter_model``); it runs once
    on ``x`` (the small head once more, on its recorded input) and is left as found. x: float ``[B, 3, H, W]``. target: the classes to explain,
    an int, one int per sample, a ``[B, k]`` tensor, or None for every class. With a SCOUTER+
    head the maps show evidence for each class, with SCOUTER- evidence against it.
    size: ``"input"`` (default), None (the feature map's ``h, w``), an int or a pair.
    normalize: min-max each map to [0, 1] (False keeps raw attention sums in [0, slots_per_class]).
    Returns ``[B, H, W]`` for an int / per-sample target, ``[B, k, H, W]`` for ``[B, k]`` and
    ``[B, num_classes, H, W]`` for None, of ``x``'s dtype on ``x``'s device.
    """
    head = _the_head(model)
    if callable(target):
        raise TypeError("target: SCOUTER explains classes: expected an int, one int per sample or a "
                        "[B, k] tensor, got a callable")
    if target is not None:  # checked before the forward pass, so a bad target costs nothing
        idx = target_indices(target, x.shape[0], head.num_classes, x.device)
    record = {}
    handle = head.register_forward_hook(lambda _m, inputs, _out: record.update(features=inputs[0]))
    try:
        with torch.no_grad():
            model(x)
            if "features" not in record:
                raise ValueError("model: its ScouterHead did not run in the forward pass")
            maps = head.class_attention(head.attend(record["features"])[1])
    finally:
        handle.remove()
    if target is not None:
        cols = idx if idx.dim() == 2 else idx[:, None]
        maps = maps.gather(1, cols[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
    out_size = tuple(x.shape[-2:]) if isinstance(size, str) and size == "input" else size
    maps = upsample_normalize(maps.to(x.dtype).contiguous(), out_size, normalize=normalize)
    return maps[:, 0] if target is not None and idx.dim() == 1 else maps


def _images_labels(data) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = (data.images, data.labels) if hasattr(data, "images") else tuple(data)
    check_tensor("data images", images, ndim=4)
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"data: expected one label per image ({images.shape[0]}), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    return images, labels.long()


def train_scouter(model: ScouterModel, data, *, epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3,
                  weight_decay: float = 1e-4, freeze_backbone: bool = True, progress: bool = True) -> list:
    """Train ``model`` (a ``ScouterModel``) in place on ``data`` with cross-entropy plus the
    head's area loss, AdamW and a cosine schedule (the authors use AdamW, step decay).

    data: ``(images [N, 3, H, W] float, labels [N] int)`` or an object with ``images`` and
    ``labels`` (e.g. ``cnnviz_fast.data.shapes(...)``) on the model's device. seed: the batch
    order. freeze_backbone: train the head only, on features computed once in the backbone's
    eval mode (the authors freeze the first backbone stages too); False fine-tunes everything.
    Shows a tqdm bar per epoch unless ``progress=False``; returns the mean loss of each epoch.
    The model's train/eval mode is restored at the end.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, ScouterModel):
        raise TypeError(f"model: expected a ScouterModel (see scouter_model), got {type(model).__name__}")
    _check_count("epochs", epochs)
    _check_count("batch_size", batch_size)
    images, labels = _images_labels(data)
    check_input(model, images, name="images")
    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    if freeze_backbone:
        model.backbone.eval()
        with torch.no_grad():
            source = torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        features_of, trained = (lambda index: source[index]), model.head
    else:
        features_of, trained = (lambda index: model.features(images[index])), model
    trained.train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            total = 0.0
            bar = tqdm(range(0, len(images), batch_size), desc=f"scouter epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            for start in bar:
                index = order[start:start + batch_size]
                logits, attention = model.head.attend(features_of(index))
                loss = nn.functional.cross_entropy(logits, labels[index]) + model.head.area_loss(attention)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(index)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            history.append(total / len(images))
    finally:
        model.train(was_training)
    return history
