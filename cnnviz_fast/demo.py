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
from .viz import SIGNED_CMAP, UNSIGNED_CMAP, heat_overlay, image_grid, overlay, save_image


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
    _add_scouter(report, out)
    _add_synthesis(model, report, out)
    _add_bench(report, out, n_images, progress)
    return report.write(out / "report.html")


# A few explainers and metrics, so the demo stays quick; `cnnviz bench` runs them all.
_BENCH_EXPLAINERS = ["grad_cam", "saliency", "guided_backprop", "integrated_gradients", "lrp"]
_BENCH_METRICS = ["deletion_auc", "insertion_auc", "pointing_game", "relevance_mass_accuracy", "sparseness"]


def _add_bench(report: Report, out: Path, n_images: int, progress: bool) -> None:
    """Score a few explainers with faithfulness, localisation and complexity metrics on the same
    images (``cnnviz bench``'s page, written beside the report and linked from it)."""
    from .bench import run_bench

    paths = run_bench(out / "bench", n_images=n_images, explainer_names=_BENCH_EXPLAINERS,
                      metric_names=_BENCH_METRICS, progress=progress)
    report.links["Explainer benchmark (metrics, deletion and insertion curves)"] = \
        paths["html"].relative_to(out).as_posix()


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


def _add_scouter(report: Report, out: Path) -> None:
    """SCOUTER+ and SCOUTER- (Li et al. 2021) side by side on one held-out image per class, and
    SCOUTER-'s evidence against the confusable class (ring vs circle, star vs cross)."""
    from .data import SHAPE_CLASSES, shapes
    from .explain.scouter import scouter_explain
    from .models import shapes_scouter
    from .models.train_scouter import CONFUSABLE

    data = shapes(60, seed=1)
    positive, negative = shapes_scouter(positive=True), shapes_scouter(positive=False)

    def side_by_side(x, why, why_not):  # rows: images, SCOUTER+ maps of `why`, SCOUTER- maps of `why_not`
        return image_grid(torch.cat([x, overlay(x, scouter_explain(positive, x, why)),
                                     overlay(x, scouter_explain(negative, x, why_not))]), nrow=len(x))

    start = time.perf_counter()
    x = data.images[[int((data.labels == c).nonzero()[0]) for c in range(len(SHAPE_CLASSES))]]
    with torch.no_grad():
        pred = positive(x).argmax(1)
        runner_up = negative(x).topk(2, dim=1).indices[:, 1]  # the class SCOUTER- ranks second
    grid = side_by_side(x, pred, runner_up)
    save_image(grid, out / "scouter.png")
    report.add("scouter", grid,
               "SCOUTER (Li et al. 2021), slot-attention heads on the default model's backbone: one held-out "
               "image per class (top row); SCOUTER+ attention for the predicted class, why it is that class "
               f"(middle: {', '.join(SHAPE_CLASSES[i] for i in pred.tolist())}); SCOUTER- attention for the "
               "runner-up class, why it is not that class (bottom: "
               f"{', '.join(SHAPE_CLASSES[i] for i in runner_up.tolist())}) "
               f"({(time.perf_counter() - start) * 1e3:.0f} ms)")

    # Both ways of each pair (train_scouter.CONFUSABLE), two images each; README scores them.
    pairs = list(CONFUSABLE.items())
    picks = [(data.labels == SHAPE_CLASSES.index(true)).nonzero()[:2, 0] for true, _ in pairs]
    x = data.images[torch.cat(picks)]
    truth = torch.cat([torch.full((len(p),), SHAPE_CLASSES.index(t)) for p, (t, _) in zip(picks, pairs)])
    wrong = torch.cat([torch.full((len(p),), SHAPE_CLASSES.index(w)) for p, (_, w) in zip(picks, pairs)])
    grid = side_by_side(x, truth, wrong)
    save_image(grid, out / "scouter_confusable.png")
    report.add("scouter_confusable", grid,
               "confusable pairs, two held-out images each of " + ", ".join(t for t, _ in pairs) + " (top row); "
               "SCOUTER+ attention for the true class (middle); SCOUTER- attention for the confusable class, "
               + ", ".join(f"{w} on the {t} images" for t, w in pairs) + ": the evidence that it is not that class "
               "(bottom). The telling feature is where the two drawings differ: the ring's hole, the circle's "
               "filled centre, the arms the star and the cross do not share")


def _add_synthesis(model, report: Report, out: Path) -> None:
    """Synthesis views, kept cheap (few steps): the first layer's filters, one class
    visualization per class, and one feature inversion per depth of a held-out image."""
    from . import class_visualization, feature_inversion, filter_grid
    from .data import shapes

    grid = filter_grid(model)
    save_image(grid, out / "filters.png")
    report.add("filter_grid", grid, "the first convolution's 3x3 RGB filters, each min-max normalized")

    start = time.perf_counter()
    classes = list(range(len(model.class_names)))
    result = class_visualization(model, classes, size=64, steps=32, lr=0.1, transforms=None)
    with torch.no_grad():
        prob = model(result.images).softmax(1).diagonal()
    grid = image_grid(result.images, nrow=len(classes))
    save_image(grid, out / "class_visualization.png")
    names = ", ".join(f"{model.class_names[c]} {p:.2f}" for c, p in zip(classes, prob.tolist()))
    report.add("class_visualization", grid,
               f"inputs maximizing each class logit (Fourier parametrization, decorrelated colour, 32 Adam "
               f"steps, all classes in one batch; {time.perf_counter() - start:.1f} s); the model's "
               f"probability of the class: {names}")

    start = time.perf_counter()
    x = shapes(1, seed=3).images
    layers = ["features.2", "features.8", "features.17"]
    images = [feature_inversion(model, x, layer, steps=40, lr=0.1).images for layer in layers]
    grid = image_grid(torch.cat([x, *images]), nrow=len(layers) + 1)
    save_image(grid, out / "feature_inversion.png")
    report.add("feature_inversion", grid,
               f"a held-out image and its reconstructions from {', '.join(layers)} (conv blocks 1, 3 and 6; "
               f"Mahendran & Vedaldi 2015 with a TV prior, 40 steps; {time.perf_counter() - start:.1f} s)")
