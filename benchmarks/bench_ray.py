"""Ray scale-out on this machine: images/s of ``top_k_patches`` (single process, all cores)
against ``top_k_patches_ray`` with 1 and 2 actors on a local Ray cluster of 2 CPUs, and
Ray's per-batch overhead, in one run.

- model: resnet18 (random weights), layers layer3 and layer4, k = 9, on generated 64x64
  images, made before timing (a tensor for the single process, rows in Ray's object store
  for Ray);
- ``wall``: the whole call, actor start-up included (Ray starts a fresh actor pool for
  every dataset it runs); ``steady``: the same call's images after the first batch over its
  time after a one-batch run of the same call, i.e. throughput with start-up taken out;
- a single-process row on one thread too (each actor runs one thread);
- overhead: the same rows on a 1x1-conv model over 8x8 images, where the model costs
  nothing: the difference of Ray's and the single process's time per batch is what Ray
  adds to each batch (scheduling, object store, the state each batch sends back).

Target (issue 18): 2 actors on 2 cores at least 0.9x the single process (steady).
The machine is shared with other jobs: the load average before and after is recorded.

    flock /tmp/cnnviz-bench.lock python3 benchmarks/bench_ray.py [--images 256] [--batch-size 32]
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


def ray_dataset(x):
    import ray
    # rows already in the object store: with an actor on each of the 2 CPUs, read tasks would
    # find no CPU left (keep a CPU free, or read first, when the data comes from files)
    return ray.data.from_items([{"id": i, "image": a} for i, a in enumerate(x.numpy())])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--overhead-batches", type=int, default=64)
    args = parser.parse_args()
    import ray
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = BenchTable("ray", images=args.images, batch_size=args.batch_size, load_before=load_before)
    cases = [("resnet18 L3+L4 64px", resnet, ["layer3", "layer4"], 64, args.images, args.batch_size),
             ("overhead 1x1 conv 8px", tiny, ["0"], 8, args.overhead_batches * 4, 4)]
    for case, model_fn, layers, size, n, bs in cases:
        x = images(n, size)
        expected = top_k_patches(model_fn(), x, layers, k=9, batch_size=bs, progress=False)
        base = table.add(case, f"single ({torch.get_num_threads()} threads)", lambda: top_k_patches(
            model_fn(), x, layers, k=9, batch_size=bs, progress=False), once=True)
        base_rate = n / (base["p50_ms"] / 1e3)   # the driver has no start-up: wall rate = steady rate
        base.update(images_per_s=base_rate, steady_images_per_s=base_rate,
                    per_batch_ms=base["p50_ms"] / (n / bs))
        # one thread, as each actor has: on a CPU shared by more processes than cores, two
        # OpenMP threads wait on each other (see tests/_single_thread.py)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one = table.add(case, "single (1 thread)", lambda: top_k_patches(
            model_fn(), x, layers, k=9, batch_size=bs, progress=False), once=True)
        torch.set_num_threads(threads)
        one.update(images_per_s=n / (one["p50_ms"] / 1e3), steady_images_per_s=n / (one["p50_ms"] / 1e3),
                   per_batch_ms=one["p50_ms"] / (n / bs), steady_vs_single=base["p50_ms"] / one["p50_ms"])
        for actors in (1, 2):
            got = {}

            def run(count=n):
                got[count] = top_k_patches_ray(ray_dataset(x[:count]), model_fn, layers, k=9, batch_size=bs,
                                               num_actors=actors)
            row = table.add(case, f"ray {actors} actor{'s' if actors > 1 else ''}", run, once=True)
            for layer in layers:   # the single process's answer (its 2 threads may round differently)
                torch.testing.assert_close(got[n][layer].values, expected[layer].values)
            start = time.perf_counter()
            run(bs)   # start-up and one batch
            startup = time.perf_counter() - start
            wall = row["p50_ms"] / 1e3
            steady = (n - bs) / max(wall - startup, 1e-9)
            row.update(images_per_s=n / wall, steady_images_per_s=steady, startup_s=startup,
                       per_batch_ms=(wall - startup) / max(1, n / bs - 1) * 1e3, steady_vs_single=steady / base_rate)
    ray.shutdown()
    table.meta["load_after"] = os.getloadavg()
    table.report(note=f"speedup: wall time vs the single process (Ray's start-up included); "
                      f"steady_vs_single: images/s with start-up taken out; load average "
                      f"{load_before[0]:.1f} before, {table.meta['load_after'][0]:.1f} after (shared CPU)")


if __name__ == "__main__":
    main()
