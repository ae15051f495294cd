"""``explain_dataset`` end to end (decode in DataLoader workers, forward, Grad-CAM, shard and
index writes) against a bare forward loop over the same DataLoader, in one run.

Cases: ResNet-50 (random weights, ``cnnviz_fast.models:resnet50``) at 224 px over JPEGs written
by the benchmark at 256 px (resize 256, crop 224, ImageNet normalization), and the embedded
default model over 64 px JPEGs. Each measurement runs in a child process so that its peak
resident memory is its own (``VmHWM`` of /proc/self/status, the high-water mark of the child's
own address space; Linux's ``ru_maxrss`` keeps the parent's size from before the exec); the end-to-end run is also measured on a quarter of
the images, to show that peak memory does not grow with the dataset.

    flock /tmp/cnnviz-bench.lock python3 benchmarks/bench_explain.py [--resnet-images N] [--default-images N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import BenchTable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH, WORKERS = 32, 2


def _write_jpegs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from cnnviz_fast.data import shapes
    for start in range(0, n, 100):  # in chunks: 2,000 images at 256 px are 1.5 GB as float32
        data = shapes(min(100, n - start), size=size, seed=start)
        for i, (x, label) in enumerate(zip(data.images, data.labels)):
            path = folder / data.class_names[label] / f"{start + i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(path, quality=90)


def _child(kind: str, model: str, data: str, n: int) -> dict:
    """One measurement in this process: images/s and peak RSS."""
    import cnnviz_fast as cf
    from cnnviz_fast import pipeline as pl

    spec = None if model == "default" else model
    start = time.perf_counter()
    if kind == "explain":
        layer = "features" if spec is None else "layer4"
        with tempfile.TemporaryDirectory() as out:
            cf.explain_dataset(data, out, [f"grad_cam:layer={layer}"], model=spec, batch_size=BATCH,
                               workers=WORKERS, progress=False, report=False)
            seconds = time.perf_counter() - start
    else:  # the bare loop: the same dataset, loader, normalization and forward pass, nothing else
        loaded = pl.load_model(spec)
        items = pl.load_data(data)
        size, crop = loaded.size, loaded.crop
        mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std).view(1, 3, 1, 1)
        loader = torch.utils.data.DataLoader(pl._Decoded(items, list(range(len(items.keys))), size, crop),
                                             batch_size=BATCH, num_workers=WORKERS, collate_fn=pl._collate,
                                             prefetch_factor=4)
        seen = 0
        with torch.no_grad():
            for _, x01, _, _ in loader:
                loaded.module((x01 - mean) / std).argmax(1)
                seen += len(x01)
        assert seen == n, (seen, n)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": n / seconds,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def _run_child(kind, model, data, n) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, model, str(data), str(n)], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The 2,000 JPEGs on ResNet-50 take 7 to 30 minutes a side on this shared 2-core
    # CPU (1 to 5 images/s); the defaults keep the whole run within about 3 minutes. A GPU run:
    # --resnet-images 2000 --default-images 2000.
    parser.add_argument("--resnet-images", type=int, default=64, help="JPEGs for ResNet-50 (default 64)")
    parser.add_argument("--default-images", type=int, default=1000, help="JPEGs for the default model (default 1000)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, data, n = args.child
        print(json.dumps(_child(kind, model, data, int(n))))
        return
    load_before = os.getloadavg()
    table = BenchTable("explain", "cpu", batch_size=BATCH, workers=WORKERS, load_before=load_before)
    with tempfile.TemporaryDirectory() as tmp:
        for case, model, n, size in (("resnet50@224", "cnnviz_fast.models:resnet50", args.resnet_images, 256),
                                     ("shapes_cnn@64", "default", args.default_images, 64)):
            for count in sorted({n, max(BATCH, n // 4)}, reverse=True):
                folder = Path(tmp) / f"{case}-{count}"
                _write_jpegs(folder, count, size)
                runs = [("bare forward loop", "bare")] if count == n else []
                for provider, kind in runs + [("explain grad_cam", "explain")]:
                    r = _run_child(kind, model, folder, count)
                    label = f"{case} x{count}"
                    ms = 1e3 * r["seconds"] / count
                    row = dict(case=label, provider=provider, p50_ms=ms, p20_ms=ms, p80_ms=ms,
                               vs_baseline=1.0, images_per_s=r["images_per_s"], peak_rss_mb=r["peak_rss_mb"])
                    base = next((x for x in table.rows if x["case"] == label), None)
                    if base is not None:
                        row["vs_baseline"] = base["p50_ms"] / ms
                    table.rows.append(row)
                    print(f"  {label:<24} {provider:<20} {r['images_per_s']:8.1f} img/s  "
                          f"{row['vs_baseline']:5.2f}x  peak {r['peak_rss_mb']:.0f} MB", flush=True)
    table.meta["load_after"] = os.getloadavg()
    table.report(note=f"ms per image; load average before {load_before[0]:.1f}, after "
                      f"{table.meta['load_after'][0]:.1f}")


if __name__ == "__main__":
    main()
