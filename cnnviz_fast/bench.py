"""``cnnviz bench``: every explainer x every metric on one model and data set, written as JSON,
CSV, Markdown and an HTML page with the deletion and insertion curves.

Explainers give ``[B, H, W]`` maps in [0, 1] (input attributions reduced over channels and
min-max normalised per image) of the predicted class; metrics score them per image and the
table holds each metric's mean with a 95% interval (normal approximation, 1.96 standard
errors, NaN scores left out and counted), the explainer's images per second and its peak
memory (CUDA: ``max_memory_allocated``; CPU: the process's resident set above its level at
the start, sampled every 5 ms).
"""
from __future__ import annotations

import csv
import importlib
import io
import json
import math
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import metrics
from ._atomic import atomic_write

# Metric name -> (better: "higher" | "lower", needs masks); the order of the table's columns.
METRICS = {
    "deletion_auc": ("lower", False), "insertion_auc": ("higher", False),
    "pixel_flipping_auc": ("lower", False), "region_perturbation_auc": ("higher", False),
    "faithfulness_correlation": ("higher", False),
    "pointing_game": ("higher", True), "energy_pointing_game": ("higher", True),
    "relevance_mass_accuracy": ("higher", True), "relevance_rank_accuracy": ("higher", True),
    "attribution_localisation": ("higher", True),
    "sparseness": ("higher", False), "complexity": ("lower", False),
    "random_logit": ("lower", False), "mprt_last_layer": ("lower", False),
}
_STEPS = 32  # deletion, insertion and pixel-flipping steps per image


def _input_map(attributions, signed: bool):
    """``[B, C, H, W]`` input attributions -> ``[B, H, W]`` in [0, 1]: positive channel sum
    (relevance methods) or max |a| over channels (gradient methods), min-max normalised."""
    from . import to_map, upsample_normalize

    heat = to_map(attributions, "sum").clamp(min=0) if signed else to_map(attributions, "max_abs")
    return upsample_normalize(heat[:, None], heat.shape[-2:])[:, 0]


def explainers(layer) -> dict:
    """Name -> ``fn(model, x, target) -> [B, H, W]`` in [0, 1]: the CAM family on ``layer``
    (None leaves it out), occlusion, the gradient family and LRP."""
    from . import (cam, deeplift, grad_cam, grad_cam_pp, guided_backprop, integrated_gradients, layer_cam, lrp,
                   occlusion, saliency, score_cam, smoothgrad, upsample_normalize)

    table = {}
    if layer is not None:
        table.update({
            "cam": lambda m, x, t: cam(m, x, t, layer=layer),
            "grad_cam": lambda m, x, t: grad_cam(m, x, t, layer),
            "grad_cam_pp": lambda m, x, t: grad_cam_pp(m, x, t, layer),
            "layer_cam": lambda m, x, t: layer_cam(m, x, t, layer),
            "score_cam": lambda m, x, t: score_cam(m, x, t, layer),
        })
    table.update({
        "occlusion": lambda m, x, t: upsample_normalize(
            occlusion(m, x, t, window=max(1, x.shape[-1] // 8), stride=max(1, x.shape[-1] // 16))[:, None],
            x.shape[-2:])[:, 0],
        "saliency": lambda m, x, t: _input_map(saliency(m, x, t), signed=False),
        "guided_backprop": lambda m, x, t: _input_map(guided_backprop(m, x, t), signed=False),
        "smoothgrad": lambda m, x, t: _input_map(
            smoothgrad(m, x, t, n_samples=16, generator=torch.Generator().manual_seed(0)), signed=False),
        "integrated_gradients": lambda m, x, t: _input_map(integrated_gradients(m, x, t, steps=32), signed=True),
        "deeplift": lambda m, x, t: _input_map(deeplift(m, x, t), signed=True),
        "lrp": lambda m, x, t: _input_map(lrp(m, x, t), signed=True),
    })
    return table


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if n % d == 0)


def _score(name, model, x, target, heat, masks, explain):
    """``[B]`` scores of one metric, and the curves for the deletion/insertion plots."""
    H, W = x.shape[-2:]
    if name in ("deletion_auc", "insertion_auc"):
        curves, area = (metrics.deletion if name == "deletion_auc" else metrics.insertion)(
            model, x, target, heat, steps=_STEPS)
        return area, curves
    if name == "pixel_flipping_auc":
        k = _largest_divisor_at_most(H * W, H * W // _STEPS)
        curves = metrics.pixel_flipping(model, x, target, heat, features_in_step=k)
        return metrics.auc(curves, dx=1.0 / curves.shape[1]), None
    if name == "region_perturbation_auc":
        drops = metrics.region_perturbation(model, x, target, heat, patch_size=max(1, H // 8), regions=64)
        return metrics.auc(drops, dx=1.0 / drops.shape[1]), None
    if name == "faithfulness_correlation":  # logits: softmax scores saturate and give NaN correlations
        return metrics.faithfulness_correlation(model, x, target, heat, runs=32, subset_size=max(1, H * W // 16),
                                                softmax=False), None
    if name in ("sparseness", "complexity"):
        return getattr(metrics, name)(heat), None
    if name == "random_logit":
        return metrics.random_logit(model, x, target, explain), None
    if name == "mprt_last_layer":
        return list(metrics.model_randomization(model, x, target, explain, last_only=True).values())[0], None
    return getattr(metrics, name)(heat, masks), None


class _PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the sampled resident set on CPU."""

    def __init__(self, device):
        self.device, self.peak = torch.device(device), 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base, self._stop = self._rss(), threading.Event()
        self._max = self._base

        def sample():
            while not self._stop.wait(0.005):
                self._max = max(self._max, self._rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


def _summary(scores: torch.Tensor) -> dict:
    s = scores.double()
    ok = s[~torch.isnan(s)]
    n = int(ok.numel())
    mean = ok.mean().item() if n else float("nan")
    ci = 1.96 * ok.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": ci, "n": n, "nan": int(s.numel() - n)}


def load_model(spec: str):
    """``shapes_cnn`` (the embedded trained model), a ``cnnviz_fast.models`` name (random
    weights), or ``package.module:factory``; in eval mode."""
    from . import models

    if ":" in spec:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    elif spec in models.__all__ and callable(getattr(models, spec)):
        factory = getattr(models, spec)
    else:
        raise ValueError(f"--model: expected shapes_cnn, a cnnviz_fast.models name or module:factory, got {spec!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def run_bench(out, model_spec: str = "shapes_cnn", data_dir=None, n_images: int = 16, size: int | None = None,
              layer=None, explainer_names=None, metric_names=None, progress: bool = True) -> dict:
    """Run the benchmark and write ``bench.json``, ``bench.csv``, ``bench.md`` and ``bench.html``
    under ``out``; returns ``{format: path}``."""
    from .models import SHAPES_CNN_CAM_LAYER

    model = load_model(model_spec)
    default_model = model_spec == "shapes_cnn"
    if data_dir is None:
        from .data import shapes

        data = shapes(n_images, size=size or 64, seed=1)
        x, masks = data.images, data.masks
        source = f"{n_images} held-out shapes images (seed 1) with their masks"
    else:
        from .data import image_folder

        folder = image_folder(data_dir, size or (64 if default_model else 224))
        x = torch.stack([folder[i][0] for i in range(min(n_images, len(folder)))])
        masks, source = None, f"{len(x)} images of {data_dir} (no masks: localisation metrics skipped)"
    layer = layer if layer is not None else (SHAPES_CNN_CAM_LAYER if default_model else None)
    table = explainers(layer)
    chosen = _choose("--explainers", explainer_names, table)
    metric_list = [m for m in _choose("--metrics", metric_names, METRICS) if masks is not None or not METRICS[m][1]]
    with torch.no_grad():
        target = model(x).argmax(1)
    results, curves = {}, {"deletion_auc": {}, "insertion_auc": {}}
    bar = tqdm(total=len(chosen) * (1 + len(metric_list)), desc="bench", disable=not progress)
    for name in chosen:
        explain = table[name]
        bar.set_postfix_str(name)
        with _PeakMemory(x.device) as memory:
            start = time.perf_counter()
            heat = explain(model, x, target).detach()
            seconds = time.perf_counter() - start
        bar.update()
        row = {"images_per_s": len(x) / seconds, "peak_mib": memory.peak / 2**20, "metrics": {}}
        for metric in metric_list:
            bar.set_postfix_str(f"{name} {metric}")
            scores, curve = _score(metric, model, x, target, heat, masks, explain)
            row["metrics"][metric] = _summary(scores)
            if curve is not None:
                curves[metric][name] = curve.double().mean(0).tolist()
            bar.update()
        results[name] = row
    bar.close()
    doc = {"model": model_spec, "data": source, "images": len(x), "layer": layer, "metrics": metric_list,
           "better": {m: METRICS[m][0] for m in metric_list}, "explainers": results,
           "curves": {k: v for k, v in curves.items() if v}}
    return _write(Path(out), doc)


def _choose(option, names, known):
    if names is None:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    return list(names)


def _cell(summary) -> str:
    if summary["n"] == 0:
        return "n/a"
    ci = "" if math.isnan(summary["ci95"]) else f" ± {summary['ci95']:.3f}"
    return f"{summary['mean']:.3f}{ci}"


def markdown_table(doc) -> str:
    """The table of means with 95% intervals, one row per explainer."""
    arrows = {"higher": "↑", "lower": "↓"}
    head = ["explainer", "images/s", "peak MiB"] + [f"{m} {arrows[doc['better'][m]]}" for m in doc["metrics"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in doc["explainers"].items():
        cells = [name, f"{row['images_per_s']:.1f}", f"{row['peak_mib']:.0f}"]
        cells += [_cell(row["metrics"][m]) for m in doc["metrics"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve_figure(doc, metric, title):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, curve in doc["curves"][metric].items():
        ax.plot([i / (len(curve) - 1) for i in range(len(curve))], curve, label=name)
    ax.set_xlabel("fraction of pixels " + ("removed" if metric == "deletion_auc" else "inserted"))
    ax.set_ylabel("mean softmax score of the predicted class")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _write(out: Path, doc) -> dict:
    from .report import Report

    paths = {k: out / f"bench.{k}" for k in ("json", "csv", "md", "html")}
    with atomic_write(paths["json"], "w") as f:
        json.dump(doc, f, indent=1)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["explainer", "metric", "mean", "ci95", "n", "nan", "better", "images_per_s", "peak_mib"])
    for name, row in doc["explainers"].items():
        for metric, s in row["metrics"].items():
            writer.writerow([name, metric, s["mean"], s["ci95"], s["n"], s["nan"], doc["better"][metric],
                             row["images_per_s"], row["peak_mib"]])
    with atomic_write(paths["csv"], "w") as f:
        f.write(buf.getvalue())
    table = markdown_table(doc)
    with atomic_write(paths["md"], "w") as f:
        f.write(f"# cnnviz bench: {doc['model']}\n\n{doc['data']}\n\n{table}")
    facts = {"model": doc["model"], "data": doc["data"], "CAM layer": doc["layer"] or "none (CAM family left out)"}
    for name, row in doc["explainers"].items():
        facts[name] = "; ".join(f"{m} {_cell(s)}" for m, s in row["metrics"].items()) + \
            f"; {row['images_per_s']:.1f} images/s; peak {row['peak_mib']:.0f} MiB"
    report = Report(f"cnnviz bench: {doc['model']}", intro="Means over the images with 95% intervals; the full "
                    "table is in bench.md, bench.csv and bench.json beside this page.", facts=facts)
    titles = {"deletion_auc": "Deletion (Petsiuk et al. 2018): lower is better",
              "insertion_auc": "Insertion (Petsiuk et al. 2018): higher is better"}
    for metric, title in titles.items():
        if metric in doc["curves"]:
            report.add(metric.replace("_auc", ""), _curve_figure(doc, metric, title),
                       f"mean score over the {doc['images']} images after each of {_STEPS} steps")
    report.write(paths["html"])
    return paths
