"""``cnnviz demo``: every method on the embedded default model and held-out shapes images,
written as PNG overlays and one self-contained ``report.html``."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from ._hooks import capture
from .models import SHAPES_CNN_CAM_LAYER as CAM_LAYER
from .ops import upsample_normalize
from .report import Report
from .viz import image_grid, overlay, save_image


def _activation_map(model, x, target):
    """Mean activation of the CAM layer over channels, resized to the input."""
    with torch.no_grad(), capture(model, CAM_LAYER) as rec:
        model(x)
    return upsample_normalize(rec[CAM_LAYER].mean(1, keepdim=True), x.shape[-2:])[:, 0]


def _methods():
    """(name, one-line description, fn(model, x, target) -> [B, H, W] in [0, 1])."""
    from . import cam, grad_cam, grad_cam_pp, layer_cam, score_cam

    return [
        ("activation_map", "mean activation of the last conv block, upsampled", _activation_map),
        ("cam", "CAM (Zhou et al. 2016): fc rows of the class over the last conv block",
         lambda m, x, t: cam(m, x, t, layer=CAM_LAYER)),
        ("grad_cam", "Grad-CAM (Selvaraju et al. 2017)", lambda m, x, t: grad_cam(m, x, t, CAM_LAYER)),
        ("grad_cam_pp", "Grad-CAM++ (Chattopadhay et al. 2018)", lambda m, x, t: grad_cam_pp(m, x, t, CAM_LAYER)),
        ("layer_cam", "LayerCAM (Jiang et al. 2021)", lambda m, x, t: layer_cam(m, x, t, CAM_LAYER)),
        ("score_cam", "Score-CAM (Wang et al. 2020)", lambda m, x, t: score_cam(m, x, t, CAM_LAYER)),
    ]


def run_demo(out, n_images: int = 8, progress: bool = True) -> Path:
    """Run every method on ``n_images`` held-out shapes images; returns the report's path."""
    from .data import shapes
    from .models import shapes_cnn

    if n_images < 1:
        raise ValueError(f"n_images: expected >= 1, got {n_images}")
    out = Path(out)
    model = shapes_cnn()
    data = shapes(n_images, seed=1)
    x = data.images
    with torch.no_grad():
        pred = model(x).argmax(1)
    names = [data.class_names[i] for i in pred.tolist()]
    accuracy = (pred == data.labels).float().mean().item()
    report = Report("cnnviz-fast demo",
                    intro="Each figure: the held-out shapes images (top row) and the method's "
                          "heatmap for the predicted class over them (bottom row).",
                    facts={"model": "shapes_cnn (embedded default)", "images": n_images,
                           "predicted": ", ".join(names), "accuracy on these images": f"{accuracy:.0%}"})
    for name, description, method in tqdm(_methods(), desc="methods", disable=not progress):
        start = time.perf_counter()
        heat = method(model, x, pred)
        seconds = time.perf_counter() - start
        grid = image_grid(torch.cat([x, overlay(x, heat)]), nrow=n_images)
        save_image(grid, out / f"{name}.png")
        report.add(name, grid, f"{description} ({seconds * 1e3:.0f} ms for {n_images} images)")
    return report.write(out / "report.html")
