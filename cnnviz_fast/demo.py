"""``cnnviz demo``: every method on the embedded default model and held-out shapes images,
written as PNG overlays and one self-contained ``report.html``."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ._hooks import capture
from .models import SHAPES_CNN_CAM_LAYER as CAM_LAYER
from .ops import upsample_normalize
from .report import _READING, Column, Report, Row
from .viz import SIGNED_CMAP, UNSIGNED_CMAP, heat_overlay, image_grid, save_image


def _activation_map(model, x, target):
    """Mean activation of the CAM layer over channels, resized to the input."""
    with torch.no_grad(), capture(model, CAM_LAYER) as rec:
        model(x)
    return upsample_normalize(rec[CAM_LAYER].mean(1, keepdim=True), x.shape[-2:])[:, 0]


def _heatmap(attributions):
    """[B, C, H, W] input attributions -> [B, H, W]: max |attribution| over channels (the report
    scales and clips it with Captum's 2% outlier rule)."""
    from . import to_map

    return to_map(attributions, "max_abs")


def _signed_heatmap(attributions):
    """[B, C, H, W] -> [B, H, W] signed channel sum: evidence for (> 0) and against (< 0)."""
    from . import to_map

    return to_map(attributions, "sum")


# Methods whose maps keep a sign: drawn on a diverging colour map.
_SIGNED = {"occlusion", "smoothgrad", "integrated_gradients", "deeplift", "lrp"}


def _methods():
    """(name, one-line description, fn(model, x, target) -> [B, H, W] in [0, 1])."""
    from . import (cam, deconvnet, deeplift, grad_cam, grad_cam_pp, guided_backprop, integrated_gradients,
                   layer_cam, lrp, occlusion, saliency, score_cam, smoothgrad)

    return [
        ("activation_map", "mean activation of the last conv block, upsampled", _activation_map),
        ("cam", "CAM (Zhou et al. 2016): fc rows of the class over the last conv block",
         lambda m, x, t: cam(m, x, t, layer=CAM_LAYER)),
        ("grad_cam", "Grad-CAM (Selvaraju et al. 2017)", lambda m, x, t: grad_cam(m, x, t, CAM_LAYER)),
        ("grad_cam_pp", "Grad-CAM++ (Chattopadhay et al. 2018)", lambda m, x, t: grad_cam_pp(m, x, t, CAM_LAYER)),
        ("layer_cam", "LayerCAM (Jiang et al. 2021)", lambda m, x, t: layer_cam(m, x, t, CAM_LAYER)),
        ("score_cam", "Score-CAM (Wang et al. 2020)", lambda m, x, t: score_cam(m, x, t, CAM_LAYER)),
        ("occlusion", "occlusion (Zeiler & Fergus 2014), 8 px window, stride 4, incremental inference",
         lambda m, x, t: occlusion(m, x, t, window=8, stride=4, mode="incremental")),
        ("saliency", "vanilla gradient (Simonyan et al. 2014)", lambda m, x, t: _heatmap(saliency(m, x, t))),
        ("guided_backprop", "guided backpropagation (Springenberg et al. 2015)",
         lambda m, x, t: _heatmap(guided_backprop(m, x, t))),
        ("deconvnet", "deconvnet (Zeiler & Fergus 2014)", lambda m, x, t: _heatmap(deconvnet(m, x, t))),
        ("smoothgrad", "SmoothGrad (Smilkov et al. 2017), signed mean gradient, 25 samples, noise 0.15",
         lambda m, x, t: _signed_heatmap(smoothgrad(m, x, t, n_samples=25, method=partial(saliency, abs=False),
                                                    generator=torch.Generator().manual_seed(0)))),
        ("integrated_gradients", "Integrated Gradients (Sundararajan et al. 2017), black baseline, 32 steps",
         lambda m, x, t: _signed_heatmap(integrated_gradients(m, x, t, steps=32))),
        ("deeplift", "DeepLIFT rescale (Shrikumar et al. 2017), black baseline",
         lambda m, x, t: _signed_heatmap(deeplift(m, x, t))),
        ("lrp", "LRP, zennit's EpsilonPlusFlat composite (Bach et al. 2015; Montavon et al. 2019)",
         lambda m, x, t: _signed_heatmap(lrp(m, x, t))),
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
        probs, pred = model(x).softmax(1).max(1)
    names = [data.class_names[i] for i in pred.tolist()]
    accuracy = (pred == data.labels).float().mean().item()
    report = Report("cnnviz-fast demo",
                    intro="Rows: held-out shapes images, with the true class and the model's prediction under "
                          "each. Columns: every method's map for the predicted class. Click a tile to enlarge it. "
                          "Signed maps (red for the class, blue against it) are scaled per image with Captum's "
                          "2% outlier rule; the others run from low (blue) to high (red).",
                    facts={"model": "shapes_cnn (embedded default)", "images": n_images,
                           "accuracy on these images": f"{accuracy:.0%}"})
    columns, pictures = [], []
    for name, description, method in tqdm(_methods(), desc="methods", disable=not progress):
        start = time.perf_counter()
        heat = method(model, x, pred)
        seconds = time.perf_counter() - start
        signed = name in _SIGNED
        picture = heat_overlay(x, heat, signed)
        save_image(image_grid(torch.cat([x, picture]), nrow=n_images), out / f"{name}.png")
        pictures.append(picture)
        columns.append(Column(name, f"{description}, {seconds * 1e3:.0f} ms for {n_images} images. "
                                    f"{_READING[name]}", SIGNED_CMAP if signed else UNSIGNED_CMAP,
                              ("against", "for") if signed else ("low", "high")))
    rows = [Row(x[i], (f"true: {data.class_names[data.labels[i]]}",
                       f"pred: {names[i]} ({probs[i]:.0%})"), [p[i] for p in pictures]) for i in range(n_images)]
    report.add_grid("Every method, side by side", columns, rows)
    _add_investigation(model, report, out, progress)
    return report.write(out / "report.html")


def _add_investigation(model, report: Report, out: Path, progress: bool) -> None:
    """Dataset-level views: top-k patches of the CAM layer's channels, and a 2-D map of the
    embedding space, on 240 further held-out images."""
    from . import crop_patches, embed, embedding_plot, patch_grid, pca, receptive_field, top_k_patches
    from .data import shapes

    data = shapes(240, seed=2)
    channels = list(range(8))
    start = time.perf_counter()
    result = top_k_patches(model, data.images, CAM_LAYER, k=8, channels=channels, batch_size=60, progress=False)
    field = receptive_field(model, CAM_LAYER, data.images.shape[-2:])
    grid = patch_grid(crop_patches(data.images, result[CAM_LAYER], field))
    save_image(grid, out / "top_k_patches.png")
    report.add("top_k_patches", grid,
               f"the 8 image patches (exact {field.size[0]}x{field.size[1]} px receptive fields, grey = "
               f"outside the image) that most activate channels 0-7 of '{CAM_LAYER}', one row per channel, "
               f"over {len(data.images)} images ({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    vectors = embed(model, data.images, "avgpool", batch_size=60, progress=False).vectors
    figure = embedding_plot(pca(vectors), labels=data.labels, class_names=data.class_names,
                            title="PCA of the pooled features")
    save_image(figure, out / "embedding_pca.png")
    report.add("embedding_pca", figure,
               f"first two principal components of the {vectors.shape[1]}-d pooled features of "
               f"{len(vectors)} images, coloured by true class ({time.perf_counter() - start:.1f} s)")
