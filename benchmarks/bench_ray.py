"""Ray scale-out on this machine: images/s of ``top_k_patches`` in one process on every core
against ``top_k_patches_ray`` with 1 and 2 actors on a local Ray cluster of 2 CPUs, Ray's
start-up and its per-batch overhead, in one run.

- model: resnet18 (random weights), layers layer3 and layer4, k = 9, on generated 64x64
  images (``--images``, default 4096), made before timing: a tensor for the single process,
  rows in Ray's object store (one block per batch) for Ray. Same batch size on both sides.
- single process: ``torch.get_num_threads()`` threads (all cores: the same CPU count as the
  Ray cluster), run before and after the Ray rows, the faster of the two being the baseline
  of the ratios (``baseline``); and on one thread (as each actor runs) for reference.
- Ray rows: ``wall`` is the whole call (end to end, a fresh actor pool starts for every
  dataset Ray Data runs); the driver timestamps each batch's state as it is merged
  (``TopKPatches.merge`` wrapped here), which splits the call into ``startup_s`` (call to
  the completion of the first batch of each actor: actor processes, imports, model_fn,
  first pass) and the steady state after it: ``steady_images_per_s`` counts the images
  merged after that over the time they took. ``steady_vs_single`` is the target's ratio.
- overhead: the same on a 1x1-conv model over 8x8 images, where the model costs nothing:
  Ray's steady time per batch minus the single process's is what Ray adds to each batch
  (scheduling, object store, the state each batch sends back, the driver's merge).
  ``ray_ms_per_batch``: an actor's steady time per batch minus the one-thread process's.
- CPU breakdown: CPU seconds of each Ray run by process (this driver, the map actors,
  Ray's own processes, and everything else on the machine), read from /proc.

Target (issue 18): 2 actors on 2 cores at least 0.9x the single process (steady).
The machine is shared with other jobs: the load average before and after is recorded.

    flock /tmp/cnnviz-bench.lock python3 benchmarks/bench_ray.py [--images 4096] [--batch-size 128]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _runner import BenchTable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from cnnviz_fast import top_k_patches  # noqa: E402
from cnnviz_fast.distributed import top_k_patches_ray  # noqa: E402
from cnnviz_fast.explain.activations import TopKPatches  # noqa: E402
from cnnviz_fast.models import resnet18  # noqa: E402


def resnet():
    torch.manual_seed(0)
    return resnet18().eval()


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()


def image(i, size):
    return torch.empty(3, size, size).uniform_(generator=torch.Generator().manual_seed(i))


def images(n, size):
    return torch.stack([image(i, size) for i in range(n)])


def ray_dataset(x, batch_size):
    import ray
    # rows already in the object store, one block per batch: with an actor on each of the 2
    # CPUs, read tasks would find no CPU left (read first, or keep a CPU free, for files)
    ds = ray.data.from_items([{"id": i, "image": a} for i, a in enumerate(x.numpy())],
                             override_num_blocks=-(-len(x) // batch_size))
    return ds


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds():
    """{pid: (what, user + system CPU seconds)} of every process (Linux /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        what = ("driver" if int(pid) == os.getpid() else "map actors" if "MapWorker" in cmd else
                "ray" if "ray" in cmd else "other jobs")
        out[int(pid)] = (what, (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


def cpu_breakdown(before, after):
    groups = {}
    for pid, (what, seconds) in after.items():
        groups[what] = groups.get(what, 0.0) + seconds - before.get(pid, (what, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(groups.items())}


def timed_ray(table, case, model_fn, layers, x, bs, actors, expected):
    """One ``top_k_patches_ray`` call, timed end to end and batch by batch."""
    ds = ray_dataset(x, bs)
    merged, original = [], TopKPatches.merge

    def merge(self, state):
        out = original(self, state)
        merged.append((time.perf_counter(), state["images_seen"]))
        return out

    got = {}
    TopKPatches.merge = merge
    before = cpu_seconds()
    try:
        row = table.add(case, f"ray {actors} actor{'s' if actors > 1 else ''}", lambda: got.update(
            top_k_patches_ray(ds, model_fn, layers, k=9, batch_size=bs, num_actors=actors)), once=True)
    finally:
        TopKPatches.merge = original
    row["cpu_s"] = cpu_breakdown(before, cpu_seconds())
    for layer in layers:   # the single process's answer (its threads may round differently)
        torch.testing.assert_close(got[layer].values, expected[layer].values)
    start = time.perf_counter() - row["p50_ms"] / 1e3
    # steady: from the completion of the first batch of every actor (the last start-up ends there)
    (first, _), rest = merged[actors - 1], merged[actors:]
    steady_images = sum(n for _, n in rest)
    steady_s = merged[-1][0] - first
    row.update(images_per_s=len(x) / (row["p50_ms"] / 1e3), startup_s=first - start,
               steady_images_per_s=steady_images / steady_s, per_batch_ms=steady_s / len(rest) * actors * 1e3,
               batches=len(merged))
    return row


def timed_single(table, case, model_fn, layers, x, bs, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        row = table.add(case, f"single ({threads} thread{'s' if threads > 1 else ''})", lambda: top_k_patches(
            model_fn(), x, layers, k=9, batch_size=bs, progress=False), once=True)
    finally:
        torch.set_num_threads(saved)
    seconds = row["p50_ms"] / 1e3
    row.update(images_per_s=len(x) / seconds, steady_images_per_s=len(x) / seconds,
               per_batch_ms=seconds / -(-len(x) // bs) * 1e3, batches=-(-len(x) // bs))
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--overhead-batches", type=int, default=256)
    args = parser.parse_args()
    import ray
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = BenchTable("ray", images=args.images, batch_size=args.batch_size, ray_cpus=threads,
                       ray_init_s=time.perf_counter() - start, load_before=load_before)
    cases = [("resnet18 L3+L4 64px", resnet, ["layer3", "layer4"], 64, args.images, args.batch_size),
             ("overhead 1x1 conv 8px", tiny, ["0"], 8, args.overhead_batches * 4, 4)]
    for case, model_fn, layers, size, n, bs in cases:
        x = images(n, size)
        expected = top_k_patches(model_fn(), x, layers, k=9, batch_size=bs, progress=False)
        first = timed_single(table, case, model_fn, layers, x, bs, threads)
        one = timed_single(table, case, model_fn, layers, x, bs, 1)
        rays = [timed_ray(table, case, model_fn, layers, x, bs, actors, expected) for actors in (1, 2)]
        # again after the Ray rows: the faster of the two is the baseline (other jobs come and go)
        base = max(first, timed_single(table, case, model_fn, layers, x, bs, threads), key=lambda r: r["images_per_s"])
        base["baseline"] = True
        for row in [one] + rays:
            row["steady_vs_single"] = row["steady_images_per_s"] / base["images_per_s"]
            row["wall_vs_single"] = base["p50_ms"] / row["p50_ms"]
            if row is not one:  # an actor's time per batch over one thread's in one process
                row["ray_ms_per_batch"] = row["per_batch_ms"] - one["per_batch_ms"]
    ray.shutdown()
    table.meta["load_after"] = os.getloadavg()
    table.report(note=f"wall_vs_single: end to end (Ray's start-up included) vs the baseline; "
                      f"steady_vs_single: images/s after start-up vs the faster single process on {threads} threads; "
                      f"load average {load_before[0]:.1f} before, {table.meta['load_after'][0]:.1f} after "
                      f"(shared CPU)")


if __name__ == "__main__":
    main()
