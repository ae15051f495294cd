"""top_k_patches: dataset-wide top-k activating positions of resnet18's layer2, layer3 and
layer4 (k = 9) on generated 224x224 images, side by side in one run:

- forward: the plain forward pass alone (no grad), the floor;
- cnnviz-fast: ``top_k_patches`` (hooks hand each layer output to ``channel_topk_update``
  and drop it; O(C x k) memory);
- store-all: every layer output kept in memory, then ``channel_topk_ref`` over all of it.

Each provider runs the whole stream once (these runs take minutes, so no repeats); images
are generated batch by batch from a seed in every provider alike (the ``generate`` row is
that cost alone), so no provider holds the dataset. Peak memory is the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim) above its size
at the start of the provider (Linux/glibc only). Because a shared CPU makes single long runs noisy, the ``paired`` rows also
time forward and ``TopKPatches.update`` on the same batches, alternately, and give the
median per-batch ratio. Memory flatness: cnnviz-fast and store-all are rerun on
``--memory-images`` images and their peaks compared. ``cnnviz-fast bfloat16`` runs the stream
with ``compute_dtype=torch.bfloat16``; its fidelity against the float32 run: per layer, the mean
(and least) IoU over channels of the top-k (image, position) sets, and on ``--fidelity-images``
images the Spearman rank correlation of each channel's per-image maxima (what top-k ranks).

    PYTHONPATH=. python benchmarks/bench_topk.py [--images 2048] [--memory-images 256]
"""
import argparse
import ctypes
import os
import statistics
import time
from pathlib import Path

import torch

from _runner import BenchTable
from cnnviz_fast import TopKPatches, top_k_patches
from cnnviz_fast._hooks import capture
from cnnviz_fast._precision import fidelity
from cnnviz_fast.models import resnet18
from cnnviz_fast.reference import channel_topk_ref

LAYERS = ["layer2", "layer3", "layer4"]
K = 9
SIZE = 224
_LIBC = ctypes.CDLL("libc.so.6")


def batches(n, batch_size):
    """(images, ids) of ``n`` generated images, each from a seed of its own (its id), the
    images do not depend on the batch size."""
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(start + batch_size, n))
        images = torch.empty(len(ids), 3, SIZE, SIZE)
        for image, i in zip(images, ids.tolist()):
            image.uniform_(generator=torch.Generator().manual_seed(i))
        yield images, ids


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def timed_peak(fn):
    """(result, seconds, peak MiB above the resident size at the start)."""
    _LIBC.malloc_trim(0)  # give freed heap back first, so the start is not padded by earlier runs
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_status_kib("VmHWM") - start) / 1024


def run_generate(n, bs):
    for images, _ in batches(n, bs):
        pass


def run_forward(model, n, bs):
    with torch.no_grad():
        for images, _ in batches(n, bs):
            model(images)


def run_fast(model, n, bs, **kwargs):
    return top_k_patches(model, batches(n, bs), LAYERS, k=K, progress=False, backend="cpp", **kwargs)


def run_store_all(model, n, bs):
    stored = {}
    with torch.no_grad():
        for images, ids in batches(n, bs):
            with capture(model, LAYERS) as record:
                model(images)
            for layer in LAYERS:
                out = record[layer]
                if layer not in stored:
                    stored[layer] = torch.empty(n, *out.shape[1:], dtype=out.dtype)
                stored[layer][ids] = out
    return {layer: channel_topk_ref(acts, torch.arange(n), K) for layer, acts in stored.items()}


def check_equal(fast, store_all, what):
    for layer in LAYERS:
        res = fast[layer]
        flat = torch.where(res.ids >= 0, res.positions[..., 0] * res.feature_size[1] + res.positions[..., 1], -1)
        for name, got, expected in zip(("values", "ids", "positions"), (res.values, res.ids, flat),
                                       store_all[layer]):
            if not torch.equal(got, expected):
                raise AssertionError(f"{what}: {layer} {name} differ from the store-all reference")


def _entries(res):
    """Per channel, the set of (image id, flat position) of a ``TopKResult`` or of
    ``channel_topk_ref``'s (values, ids, flat positions)."""
    if hasattr(res, "feature_size"):
        flat = res.positions[..., 0] * res.feature_size[1] + res.positions[..., 1]
        ids = res.ids
    else:
        _, ids, flat = res
    return [set(zip(i, p)) for i, p in zip(ids.tolist(), flat.tolist())]


def topk_iou(low, ref):
    """Per layer (mean, min) over channels of the IoU of the two runs' top-k (id, position) sets."""
    out = {}
    for layer in LAYERS:
        ious = [len(a & b) / len(a | b) for a, b in zip(_entries(low[layer]), _entries(ref[layer]))]
        out[layer] = (statistics.mean(ious), min(ious))
    return out


def maxima(model, images, **kwargs):
    """Per layer ``[C, 1, N]``: each channel's spatial maximum in each image (top-k with k = N)."""
    run = TopKPatches(model, LAYERS, k=len(images), backend="cpp", **kwargs)
    run.update(images, torch.arange(len(images)))
    out = {}
    for layer, res in run.result().items():
        out[layer] = torch.empty(res.values.shape).scatter_(1, res.ids, res.values.float())[:, None]
    return out


def paired_ratio(model, n, bs):
    """Median over batches of update time / forward time, alternating which runs first."""
    run = TopKPatches(model, LAYERS, k=K, backend="cpp")
    ratios = []
    with torch.no_grad():
        for b, (images, ids) in enumerate(batches(n, bs)):
            times = {}
            for which in (("forward", "fast") if b % 2 else ("fast", "forward")):
                t0 = time.perf_counter()
                model(images) if which == "forward" else run.update(images, ids)
                times[which] = time.perf_counter() - t0
            ratios.append(times["fast"] / times["forward"])
    return statistics.median(ratios), min(ratios), max(ratios), len(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--memory-images", type=int, default=256,
                        help="a second, smaller count for the memory-flatness check")
    parser.add_argument("--paired-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fidelity-images", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18().eval()
    n, bs = args.images, args.batch_size

    check = min(2 * bs, n)
    # exact on the model as given; the default path (a channels-last copy with folded batch
    # norms) rounds differently, so the timed run is compared by top-k overlap below
    check_equal(run_fast(model, check, bs // 2, channels_last=False), run_store_all(model, check, bs),
                f"{check} images")
    print(f"correct: cnnviz-fast (channels_last=False) equals the store-all reference on {check} images "
          f"(batch {bs // 2} vs {bs})")

    table = BenchTable("top_k_patches", "cpu", model="resnet18", layers=LAYERS, k=K, image_size=SIZE,
                       batch_size=bs, loadavg_start=os.getloadavg())

    def add(case, provider, seconds, peak, baseline_s, **extra):
        row = dict(case=case, provider=provider, p50_ms=seconds * 1e3, p20_ms=seconds * 1e3,
                   p80_ms=seconds * 1e3, vs_baseline=baseline_s / seconds, time_ratio=seconds / baseline_s, peak_MiB=peak,
                   ms_per_image=seconds * 1e3 / int(case.split()[0]), **extra)
        table.rows.append(row)  # one long run per provider: no percentiles to measure
        print(f"  {case:<16} {provider:<12} {seconds:8.1f} s  {row['time_ratio']:5.3f}x time  peak {peak:7.1f} MiB",
              flush=True)

    case = f"{n} images"
    _, gen_s, gen_peak = timed_peak(lambda: run_generate(n, bs))
    _, fwd_s, fwd_peak = timed_peak(lambda: run_forward(model, n, bs))
    fast, fast_s, fast_peak = timed_peak(lambda: run_fast(model, n, bs))
    ref, ref_s, ref_peak = timed_peak(lambda: run_store_all(model, n, bs))
    default_overlap = {layer: dict(zip(("topk_iou_mean", "topk_iou_min"), v))
                       for layer, v in topk_iou(fast, ref).items()}
    print(f"  default path against store-all (top-k set IoU): {default_overlap}", flush=True)
    half, half_s, half_peak = timed_peak(lambda: run_fast(model, n, bs, compute_dtype=torch.bfloat16))
    images = next(batches(args.fidelity_images, args.fidelity_images))[0]
    ref_max, low_max = maxima(model, images), maxima(model, images, compute_dtype=torch.bfloat16)
    low_fidelity = {}
    for layer, (iou_mean, iou_min) in topk_iou(half, fast).items():
        spearman, _ = fidelity(low_max[layer], ref_max[layer])
        low_fidelity[layer] = dict(topk_iou_mean=iou_mean, topk_iou_min=iou_min,
                                   spearman_mean=float(spearman.mean()), spearman_min=float(spearman.min()))
        print(f"  bfloat16 {layer}: {low_fidelity[layer]}", flush=True)
    add(case, "generate", gen_s, gen_peak, fwd_s)
    add(case, "forward", fwd_s, fwd_peak, fwd_s)
    add(case, "cnnviz-fast", fast_s, fast_peak, fwd_s, overlap_with_store_all=default_overlap)
    add(case, "store-all", ref_s, ref_peak, fwd_s)
    add(case, "cnnviz-fast bfloat16", half_s, half_peak, fwd_s, vs_float32=fast_s / half_s, fidelity=low_fidelity)

    small = f"{args.memory_images} images"
    _, s_fast_s, s_fast_peak = timed_peak(lambda: run_fast(model, args.memory_images, bs))
    _, s_ref_s, s_ref_peak = timed_peak(lambda: run_store_all(model, args.memory_images, bs))
    add(small, "cnnviz-fast", s_fast_s, s_fast_peak, s_fast_s)
    add(small, "store-all", s_ref_s, s_ref_peak, s_fast_s)

    median, low, high, count = paired_ratio(model, args.paired_images, bs)
    print(f"  paired per-batch update/forward over {count} batches: median {median:.3f}x "
          f"(min {low:.3f}, max {high:.3f})")
    table.meta.update(paired_update_over_forward=dict(median=median, min=low, max=high, batches=count),
                      loadavg_end=os.getloadavg())
    table.report(note=f"time_ratio = provider time / forward time (in '{small}': / cnnviz-fast time); "
                      f"one run each on a shared CPU; paired update/forward median {median:.3f}x over {count} batches")


if __name__ == "__main__":
    main()
