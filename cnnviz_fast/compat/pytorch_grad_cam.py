"""pytorch-grad-cam's CAM classes over cnnviz-fast's engine: change
``from pytorch_grad_cam import GradCAM`` (and its ``utils.model_targets`` / ``utils.image``
imports) to ``from cnnviz_fast.compat.pytorch_grad_cam import ...`` and nothing else.

``GradCAM``, ``GradCAMPlusPlus``, ``LayerCAM``, ``ScoreCAM`` and ``EigenCAM`` take
``(model, target_layers, reshape_transform=None)`` and are called as
``cam(input_tensor, targets=None, aug_smooth=False, eigen_smooth=False)``, returning a float32
numpy array ``[B, H, W]`` in [0, 1] (a tensor on the input's device with
``return_tensors=True``), as pytorch-grad-cam 1.5.7 computes it: per layer
``relu(sum_c w_c A_c)`` resized to the input and min-max scaled, averaged over the layers and
scaled again; ``targets=None`` explains each image's top class; ``aug_smooth`` averages over
pytorch-grad-cam's six test-time augmentations (horizontal flip x brightness 0.9, 1, 1.1);
``eigen_smooth`` replaces the channel sum by the first principal component of the weighted
activations (NumPy's SVD, as pytorch-grad-cam, so the component's sign is the same).

Differences, by choice: the model's mode is set to eval for each call and restored after
(pytorch-grad-cam switches it to eval for good in its constructor); hooks live only for a call,
so nothing needs releasing, and the context manager does not swallow ``IndexError`` as the
original's ``__exit__`` does. Class targets (``ClassifierOutputTarget``, also the original
package's) run the engine's fast paths: on a GAP + linear head Grad-CAM needs no backward pass.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import grad_cam, grad_cam_pp, layer_activations, layer_cam
from .._hooks import capture, layer_gradients
from .._precision import lowered
from ..explain.cam import _grad_cam_pp_weights, _score_cam_chunk
from ..ops import cam_combine, upsample_normalize

__all__ = ["GradCAM", "GradCAMPlusPlus", "LayerCAM", "ScoreCAM", "EigenCAM", "ClassifierOutputTarget",
           "ClassifierOutputSoftmaxTarget", "SemanticSegmentationTarget", "FasterRCNNBoxScoreTarget",
           "show_cam_on_image", "scale_cam_image"]


# ----------------------------------------------------------------------------- targets

class ClassifierOutputTarget:
    """The logit of ``category`` (pytorch-grad-cam's, same semantics)."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]


class ClassifierOutputSoftmaxTarget(ClassifierOutputTarget):
    """The softmax probability of ``category``."""

    def __call__(self, model_output):
        return super().__call__(torch.softmax(model_output, dim=-1))


class SemanticSegmentationTarget:
    """The sum of ``category``'s scores over the pixels of ``mask`` ([H, W], numpy or tensor) in a
    segmentation model's per-image output ``[classes, H, W]``."""

    def __init__(self, category, mask):
        self.category = category
        self.mask = torch.as_tensor(mask)

    def __call__(self, model_output):
        return (model_output[self.category, :, :] * self.mask.to(model_output.device)).sum()


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``[n, 4]`` and ``[m, 4]`` (x1, y1, x2, y2): ``[n, m]`` (torchvision's box_iou)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    return inter / (area_a[:, None] + area_b[None] - inter)


class FasterRCNNBoxScoreTarget:
    """Detection target on a torchvision-style output dict (``boxes``, ``labels``, ``scores``):
    for each reference box, the IoU plus the score of the best-overlapping detection of the same
    label when the IoU exceeds ``iou_threshold``; summed (pytorch-grad-cam's)."""

    def __init__(self, labels, bounding_boxes, iou_threshold=0.5):
        self.labels, self.bounding_boxes, self.iou_threshold = labels, bounding_boxes, iou_threshold

    def __call__(self, model_outputs):
        boxes = model_outputs["boxes"]
        output = torch.zeros(1, device=boxes.device, dtype=boxes.dtype)
        if len(boxes) == 0:
            return output
        for box, label in zip(self.bounding_boxes, self.labels):
            ious = _box_iou(torch.as_tensor(box[None, :], device=boxes.device, dtype=boxes.dtype), boxes)
            index = ious.argmax()
            if ious[0, index] > self.iou_threshold and model_outputs["labels"][index] == label:
                output = output + ious[0, index] + model_outputs["scores"][index]
        return output


def _category(target):
    """The class index of a ClassifierOutputTarget (ours or pytorch-grad-cam's), else None."""
    if type(target).__name__ == "ClassifierOutputTarget" and isinstance(getattr(target, "category", None), int):
        return target.category
    return None


class _Scored(nn.Module):
    """The model with each image's target applied inside: ``[n, 1]`` scores, row ``i`` scored by
    ``targets[i]`` (``None``: each row's top class). Detection and segmentation outputs (a list
    of dicts, ``[n, classes, H, W]``) thereby reach the engine as one score per image."""

    def __init__(self, model, targets):
        super().__init__()
        self.model, self.targets = model, targets

    def forward(self, x):
        output = self.model(x)
        if self.targets is None:
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                raise ValueError("targets: None picks each image's top class, which needs a [B, classes] "
                                 "model output; pass targets for other outputs")
            return output.gather(1, output.argmax(1, keepdim=True))
        return torch.stack([t(o).sum() for t, o in zip(self.targets, output)])[:, None]


# ----------------------------------------------------------------------------- image helpers

def scale_cam_image(cam, target_size=None):
    """Each map of ``cam`` ``[n, h, w]`` shifted to 0 and divided by ``1e-7 + max`` (optionally
    resized to ``target_size = (W, H)``, bilinear), as pytorch-grad-cam's; numpy float32 for
    numpy input, a tensor for a tensor."""
    t = torch.as_tensor(cam, dtype=torch.float32)
    flat = t.flatten(1)
    t = t - flat.min(1).values.view(-1, *([1] * (t.dim() - 1)))
    t = t / (1e-7 + t.flatten(1).max(1).values.view(-1, *([1] * (t.dim() - 1))))
    if target_size is not None:
        t = F.interpolate(t[:, None], size=tuple(target_size)[::-1], mode="bilinear", align_corners=False)[:, 0]
    return t if isinstance(cam, torch.Tensor) else t.numpy()


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap: int = 2,
                      image_weight: float = 0.5) -> np.ndarray:
    """pytorch-grad-cam's overlay: OpenCV's ``colormap`` (default 2, ``cv2.COLORMAP_JET``) of
    ``mask`` [H, W] in [0, 1] blended with ``img`` [H, W, 3] float in [0, 1], ``uint8`` out.
    Needs OpenCV, as the original (``pip install opencv-python-headless``)."""
    try:
        import cv2
    except ImportError:
        raise ImportError("show_cam_on_image: needs OpenCV for its colormaps, as pytorch-grad-cam's; "
                          "pip install opencv-python-headless") from None
    if np.max(img) > 1:
        raise ValueError("img: expected np.float32 values in [0, 1]")
    if image_weight < 0 or image_weight > 1:
        raise ValueError(f"image_weight: expected a value in [0, 1], got {image_weight}")
    heatmap = cv2.applyColorMap(np.uint8(255 * mask), colormap)
    if use_rgb:
        heatmap = cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB)
    cam = (1 - image_weight) * (np.float32(heatmap) / 255) + image_weight * img
    return np.uint8(255 * (cam / np.max(cam)))


def _projection(weighted: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``get_2d_projection``: each sample's ``[K, h, w]`` projected on the first
    right singular vector of its centred ``[h w, K]`` matrix; NumPy's SVD (LAPACK gesdd), as the
    original, since the singular vector's sign is whatever the routine gives."""
    a = weighted.detach().float().cpu().numpy().copy()
    a[np.isnan(a)] = 0
    out = []
    for act in a:
        m = act.reshape(act.shape[0], -1).T
        m = m - m.mean(axis=0)
        vt = np.linalg.svd(m, full_matrices=False)[2]
        out.append((m @ vt[0]).reshape(act.shape[1:]))
    return torch.from_numpy(np.float32(out)).to(weighted.device)


def _resized(cam, x):
    """pytorch-grad-cam's per-layer scaling: ``[B, h, w]`` maps (ReLU applied) scaled by
    ``scale_cam_image`` at the layer's resolution, then resized to x's size (bilinear,
    ``cv2.resize``'s numbers) without scaling again: the layers' maps are averaged before the
    last scaling, so where each one is scaled matters."""
    return upsample_normalize(scale_cam_image(cam)[:, None], tuple(x.shape[-2:]), normalize=False)[:, 0]


@contextlib.contextmanager
def _eval_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- the CAM classes

class _BaseCAM:
    """pytorch-grad-cam's ``BaseCAM`` interface. Subclasses give the engine's fused method
    (``_engine``) and the channel weights from activations and gradients (``_weights``) for the
    general path (``reshape_transform`` or ``eigen_smooth``)."""
    _engine = None
    _uses_gradients = True

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(target_layers, nn.Module) or not target_layers:
            raise TypeError("target_layers: expected a non-empty list of modules, e.g. [model.layer4[-1]]")
        self.model, self.target_layers = model, list(target_layers)
        self.reshape_transform = reshape_transform
        self.device = next(model.parameters()).device
        self.outputs = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None

    def __call__(self, input_tensor: torch.Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False, return_tensors: bool = False):
        if not isinstance(input_tensor, torch.Tensor) or input_tensor.dim() != 4:
            raise ValueError("input_tensor: expected a [B, C, H, W] tensor (3-D volumes are not supported here)")
        x = input_tensor.to(self.device)
        if targets is not None and len(targets) != x.shape[0]:
            raise ValueError(f"targets: expected one target per image ({x.shape[0]}), got {len(targets)}")
        with _eval_mode(self.model):
            cams = self._augmented(x, targets, eigen_smooth) if aug_smooth else self._forward(x, targets, eigen_smooth)
        return cams if return_tensors else cams.cpu().numpy()

    def _augmented(self, x, targets, eigen_smooth):
        """The mean over ttach's HorizontalFlip x Multiply(0.9, 1, 1.1), in one batch."""
        flips, factors = (False, True), (0.9, 1, 1.1)
        views = [(x.flip(3) if flip else x) * factor for flip in flips for factor in factors]
        n = len(views)
        cams = self._forward(torch.cat(views), None if targets is None else list(targets) * n, eigen_smooth)
        cams = cams.view(n, x.shape[0], *cams.shape[1:])
        cams = torch.cat([cams[:len(factors)], cams[len(factors):].flip(3)])
        return cams.mean(0)

    def _forward(self, x, targets, eigen_smooth):
        categories = None if targets is None else [_category(t) for t in targets]
        if categories is not None and all(c is not None for c in categories):
            model, target = self.model, torch.tensor(categories, device=x.device)
        else:
            model, target = _Scored(self.model, targets).eval(), 0
        with self._recorded_output():
            maps = [self._layer_map(model, x, target, layer, eigen_smooth) for layer in self.target_layers]
        return scale_cam_image(torch.stack(maps, 1).clamp_min(0).mean(1))

    @contextlib.contextmanager
    def _recorded_output(self):
        """Keep the model's first output of the call as ``self.outputs`` (as the original does)."""
        self.outputs = None

        def hook(_module, _inputs, output):
            if self.outputs is None:
                self.outputs = output.detach() if isinstance(output, torch.Tensor) else output

        handle = self.model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _layer_map(self, model, x, target, layer, eigen_smooth):
        """One layer's ``[B, H, W]`` map at the input size."""
        if self.reshape_transform is None and not eigen_smooth:
            return _resized(type(self)._engine(model, x, target, layer, normalize=False, size=None), x)
        acts, grads, _ = layer_gradients(model, x, layer, target)
        if self.reshape_transform is not None:
            acts, grads = self.reshape_transform(acts), self.reshape_transform(grads)
        return self._combine(acts, self._weights(acts, grads), x, eigen_smooth)

    @staticmethod
    def _combine(acts, weights, x, eigen_smooth):
        if not eigen_smooth:
            return _resized(cam_combine(acts, weights, None, normalize=False), x)
        weighted = acts * (weights[..., None, None] if weights.dim() == 2 else weights)
        return _resized(_projection(weighted).clamp_min(0), x)

    def __repr__(self):
        return f"{type(self).__name__}(target_layers={len(self.target_layers)})"


class GradCAM(_BaseCAM):
    """pytorch-grad-cam's ``GradCAM`` on ``cnnviz_fast.grad_cam``: ``w_c = mean dY/dA_c``."""
    _engine = staticmethod(grad_cam)

    @staticmethod
    def _weights(acts, grads):
        return grads.mean((-2, -1))


class GradCAMPlusPlus(_BaseCAM):
    """pytorch-grad-cam's ``GradCAMPlusPlus`` on ``cnnviz_fast.grad_cam_pp``."""
    _engine = staticmethod(grad_cam_pp)
    _weights = staticmethod(_grad_cam_pp_weights)


class LayerCAM(_BaseCAM):
    """pytorch-grad-cam's ``LayerCAM`` on ``cnnviz_fast.layer_cam``: per-position ``relu(dY/dA)``."""
    _engine = staticmethod(layer_cam)

    @staticmethod
    def _weights(acts, grads):
        return grads.clamp_min(0)


class ScoreCAM(_BaseCAM):
    """pytorch-grad-cam's ``ScoreCAM``: each channel, upsampled with ``align_corners=True`` and
    scaled to [0, 1] by ``(A - min) / (max - min + 1e-8)`` (pytorch-grad-cam's choices, which
    the engine's ``score_cam`` does not share), masks the image; the weights are the softmax
    over channels of the target's scores on the masked images. Masked images are built per
    image and chunk of channels, ``batch_size`` (attribute, as the original's; default the
    engine's Score-CAM budget) per forward pass."""
    _uses_gradients = False

    def _layer_map(self, model, x, target, layer, eigen_smooth):
        with torch.no_grad(), capture(self.model, layer) as record:
            model(x)
        acts = record[layer]
        if self.reshape_transform is not None:
            acts = self.reshape_transform(acts)
        if not isinstance(model, _Scored):
            def score(b, out):
                return out[:, target[b]]
        elif model.targets is None:   # each image's top class on the clean image, as the original
            top = self.outputs.argmax(1)

            def score(b, out):
                return out[:, top[b]]
        else:
            def score(b, out):
                return torch.stack([model.targets[b](o).sum() for o in out])
        chunk = getattr(self, "batch_size", None) or _score_cam_chunk(x, None)
        # the masked passes (the whole cost) on the engine's converted copy: channels-last, batch
        # norms folded, the same scores to float32 rounding
        runs, _ = lowered(self.model, x)
        B, K = acts.shape[:2]
        scores = torch.empty(B, K, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for b in range(B):
                for start in range(0, K, chunk):
                    up = F.interpolate(acts[b:b + 1, start:start + chunk], size=tuple(x.shape[-2:]), mode="bilinear",
                                       align_corners=True)[0]
                    flat = up.flatten(1)
                    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
                    masked = x[b] * ((up - lo) / (hi - lo + 1e-8))[:, None]
                    scores[b, start:start + len(up)] = score(b, runs(masked))
        return self._combine(acts, torch.softmax(scores, -1).to(acts.dtype), x, eigen_smooth)


class EigenCAM(_BaseCAM):
    """pytorch-grad-cam's ``EigenCAM``: the first principal component of the layer's
    activations (NumPy's SVD, as the original); no gradients, no targets. The forward pass
    stops after the layer (``cnnviz_fast.layer_activations``)."""
    _uses_gradients = False

    def _layer_map(self, model, x, target, layer, eigen_smooth):
        acts = layer_activations(self.model, x, layer)
        if self.reshape_transform is not None:
            acts = self.reshape_transform(acts)
        return _resized(_projection(acts).clamp_min(0), x)
