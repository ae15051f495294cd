"""Faithfulness metrics: Quantus 0.6, cnnviz and the forward floor on the same work, in one run.

Pixel flipping and region perturbation on the embedded default model (32 shapes images,
64 px) and on a random-weight ResNet-18 (8 images, 224 px). ``quantus`` is Quantus 0.6's
``PixelFlipping`` / ``RegionPerturbation`` (one perturbation step of the whole batch at a time,
numpy copies in between), ``cnnviz`` is ``cnnviz_fast.metrics`` (every step of every image
made by ``perturb_by_rank`` and streamed through the model in memory-budget chunks),
``forward floor`` is the model alone on the same number of images (clean copies, made before
timing) in batches of the best size among ``FLOOR_BATCHES``, in the faster layout; ``cnnviz
channels_last=False`` runs the model as given, default ``cnnviz`` a channels-last copy with its
batch norms folded (``cnnviz_fast._precision``), whose own floor is the last row. Columns:
``vs_baseline`` = Quantus' time over the row's; ``of_floor`` = the row's time over the floor's
(target <= 1.15); ``of_converted_floor`` = over the converted copy's floor; ``images`` = forward
passes. Quantus and both cnnviz results are checked equal (1e-4; float32 rounding).

Attributions are random per element ([B, C, H, W]): Quantus wants ``features_in_step`` to
divide H * W and counts elements, so the same configuration is element-wise for both.
Threads: ``--threads`` (default 1), set before torch loads (a machine shared by several jobs
on 2 cores makes OpenMP threads wait for each other). Each provider runs once (runs last
seconds to minutes); the load average is recorded.

    PYTHONPATH=. python benchmarks/bench_metrics.py [--threads=1] [--cases default,resnet18]
"""
import argparse
import os
import sys

if __name__ == "__main__":
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
    os.environ.setdefault("OMP_NUM_THREADS", _threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _runner import BenchTable, measure  # noqa: E402
from cnnviz_fast import metrics, models  # noqa: E402
from cnnviz_fast._precision import lowered  # noqa: E402
from cnnviz_fast.data import shapes  # noqa: E402
from tests._peers import import_quantus  # noqa: E402

FLOOR_BATCHES = (16, 32, 64)
# (name, model factory, images, size, pixel-flipping features_in_step, region patch, regions)
CASES = {
    "default": ("shapes_cnn 32x64px", lambda: models.shapes_cnn(), 32, 64, 128, 8, 64),
    "resnet18": ("resnet18 8x224px", lambda: models.resnet18(), 8, 224, 6272, 32, 24),
}


def best_batch(model, x):
    """The fastest batch size and layout for the model: min of two runs of each."""
    best = None
    for layout in (torch.contiguous_format, torch.channels_last):
        for batch in FLOOR_BATCHES:
            chunk = x[:1].repeat(batch, 1, 1, 1).contiguous(memory_format=layout)
            with torch.no_grad():
                per_image = min(measure(lambda: model(chunk), once=True)[0] for _ in range(2)) / batch
            if best is None or per_image < best[0]:
                best = (per_image, batch, layout)
    return best[1:]


def floor_of(model, x, n_images, batch, layout):
    """The model alone on ``n_images`` clean copies in batches of ``batch``, softmaxed."""
    copies = x.repeat((n_images + len(x) - 1) // len(x), 1, 1, 1)[:n_images].contiguous(memory_format=layout)

    def floor():
        with torch.no_grad():
            for s in range(0, n_images, batch):
                model(copies[s:s + batch]).softmax(1)
    return floor


def run_case(table, quantus, key):
    name, factory, n, size, fis, patch, regions = CASES[key]
    torch.manual_seed(0)
    model = factory().eval()
    data = shapes(n, size=size, seed=1)
    x, y = data.images, data.labels if key == "default" else torch.randint(0, 1000, (n,))
    a = torch.rand(n, 3, size, size)
    steps = 3 * size * size // fis
    n_regions = min(regions, (-(-size // patch)) ** 2)
    xn, yn, an = x.numpy(), y.numpy(), a.numpy()
    results = {}

    def keep(label, fn):
        def run():
            results[label] = fn()
        return run

    work = [
        ("pixel_flipping", n * steps,
         lambda: np.asarray(quantus.PixelFlipping(features_in_step=fis, perturb_baseline=0.0, disable_warnings=True)(
             model=model, x_batch=xn, y_batch=yn, a_batch=an, channel_first=True, softmax=True, device="cpu")),
         lambda **k: metrics.pixel_flipping(model, x, y, a, features_in_step=fis, **k)),
        ("region_perturbation", n * (n_regions + 1),
         lambda: np.asarray(quantus.RegionPerturbation(patch_size=patch, regions_evaluation=regions,
                                                       perturb_baseline=0.0, disable_warnings=True)(
             model=model, x_batch=xn, y_batch=yn, a_batch=an, channel_first=True, softmax=True, device="cpu")),
         lambda **k: metrics.region_perturbation(model, x, y, a, patch_size=patch, regions=regions, **k)),
    ]
    batch, layout = best_batch(model, x)
    layout_name = "channels_last" if layout == torch.channels_last else "contiguous"
    converted, _ = lowered(model, x)  # what cnnviz runs by default: channels-last, batch norms folded
    for metric, images, peer, ours in work:
        case = f"{key} {metric}"
        meta = dict(images=images, model=name)
        q = table.add(case, "quantus 0.6", keep("quantus", peer), once=True, **meta)
        keep("cnnviz", ours)()  # warm-up (oneDNN primitive caches), and the result checked below
        c = table.add(case, "cnnviz", keep("cnnviz", ours), once=True, **meta)
        e = table.add(case, "cnnviz channels_last=False (the model as given)",
                      keep("exact", lambda: ours(channels_last=False)), once=True, **meta)
        f = table.add(case, f"forward floor b{batch} {layout_name}", floor_of(model, x, images, batch, layout),
                      once=True, **meta)
        fc = table.add(case, f"forward floor b{batch}, cnnviz's converted copy",
                       floor_of(converted, x, images, batch, torch.channels_last), once=True, **meta)
        expected = torch.from_numpy(results["quantus"]).double()
        err = max((results[k].double() - expected).abs().max().item() for k in ("cnnviz", "exact"))
        assert err < 1e-4, f"{case}: cnnviz and Quantus differ by {err}"
        for row in (q, c, e, f, fc):
            row["of_floor"] = row["p50_ms"] / f["p50_ms"]
            row["of_converted_floor"] = row["p50_ms"] / fc["p50_ms"]
            row["max_abs_diff_vs_quantus"] = err
        print(f"  {case}: cnnviz {q['p50_ms'] / c['p50_ms']:.2f}x Quantus, {c['of_floor']:.3f}x the floor, "
              f"{c['of_converted_floor']:.3f}x its own model's floor; as given {q['p50_ms'] / e['p50_ms']:.2f}x "
              f"Quantus, {e['of_floor']:.3f}x the floor")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="default,resnet18")
    parser.add_argument("--threads", default="1", help="torch and OpenMP threads (pass as --threads=N)")
    args = parser.parse_args()
    torch.set_num_threads(int(args.threads))
    quantus = import_quantus()
    if quantus is None:
        sys.exit("bench_metrics: quantus is not installed (pip install --no-deps quantus==0.6.0)")
    if not hasattr(np, "trapz"):  # Quantus' AUC helper calls np.trapz, which numpy 2.4 removed
        np.trapz = np.trapezoid
    load_before = os.getloadavg()
    table = BenchTable("metrics", quantus=quantus.__version__, load_before=load_before)
    for key in args.cases.split(","):
        run_case(table, quantus, key)
    table.meta["load_after"] = os.getloadavg()
    table.report(f"one run per provider; load average {load_before[0]:.2f} before, "
                 f"{table.meta['load_after'][0]:.2f} after (other jobs shared the CPU)")


if __name__ == "__main__":
    main()
