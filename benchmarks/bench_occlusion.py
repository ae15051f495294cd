"""Occlusion: full re-inference (batched), Captum's Occlusion at perturbations_per_eval 1, 16
and 64, and cnnviz-fast exact / incremental / approximate, side by side in one run.

224x224 inputs, window 16, strides 8 and 4, random weights (vgg16, resnet18). A full map is
729 (stride 8) or 2809 (stride 4) forward passes, minutes per provider on this small CPU, so
the sweep rows time every provider on the same subset of window positions: a grid of
``--grid`` x ``--grid`` (top, left) corners spread evenly over the stride's corners, borders
included. Every provider's time includes its set-up (``setup_ms``: one clean forward pass, or
for incremental the trace and the clean pass that keeps every activation), which a whole map
pays once: ``window_ms`` leaves it out, ``per_window_x`` is full re-inference's
``window_ms`` over the row's. ``theory_x`` is the FLOP (conv and linear MACs) ratio of full
over incremental inference averaged over the row's positions, ``theory_all_x`` over all of
the stride's positions; ``of_theory`` is ``per_window_x / theory_x``;
``per_window_vs_channels_last`` and ``of_theory_channels_last`` the same against full
re-inference on channels-last copies.

The full-map rows (stride ``--map-strides``) compute every window of the stride: full
re-inference (one run: it takes minutes), the exact map by incremental inference (checked
against ``mode="exact"``, and the reference of every row's SSIM) and the approximate
settings (tau, refine fraction r; "bf16": ``compute_dtype=torch.bfloat16``). Their speedups
are measured against that full re-inference run, set-up included; ``of_theory`` = speedup /
``theory_x``; ``vs_channels_last`` against full re-inference on channels-last copies (the
layout oneDNN prefers, which cnnviz's incremental engine uses on CPU), also one whole run.

The last rows run the approximations on a trained network, the embedded default model, on
16 shapes images (64 px, window 8, stride 4), with the mean SSIM against the exact maps:
random-weight maps are noise-like and understate what the drill-down keeps.

Threads: ``--threads`` (default 1) for torch and the C++ kernels, set before torch loads. On
this machine, shared by several processes on 2 cores, two OpenMP threads make every operator
wait for a descheduled partner (a batch-1 resnet18 forward took 3.4 s with 2 threads, 0.085 s
with 1), which would measure the machine's load rather than the methods.

    PYTHONPATH=. python benchmarks/bench_occlusion.py [--grid 4] [--models vgg16,resnet18]
"""
import argparse
import os
import sys

if __name__ == "__main__":
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
    os.environ.setdefault("OMP_NUM_THREADS", _threads)

import torch  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from _runner import BenchTable, measure  # noqa: E402
from captum.attr import Occlusion  # noqa: E402
from cnnviz_fast import data, models, occlusion  # noqa: E402
from cnnviz_fast.explain._incremental import incremental_engine, theoretical_flop_ratio  # noqa: E402
from cnnviz_fast.explain.occlusion import _Sweep, _window_positions  # noqa: E402
from cnnviz_fast.reference.upsample import minmax_normalize_ref  # noqa: E402

SIZE, WINDOW = 224, (16, 16)
# (tau, refine_fraction, compute_dtype) of the approximate rows: tau caps the projective fields
# (1.0: no cap), r is the drill-down's refined fraction at the fine stride (coarse stride 16 =
# the window; 1.0: no drill-down), compute_dtype None keeps float32
APPROXIMATE = [(0.7, 1.0, None), (0.6, 1.0, None), (0.5, 1.0, None), (1.0, 0.5, None), (0.6, 0.5, None),
               (0.3, 0.1, None), (1.0, 1.0, torch.bfloat16), (0.6, 1.0, torch.bfloat16), (0.55, 1.0, torch.bfloat16),
               (0.6, 0.9, torch.bfloat16), (0.6, 0.5, torch.bfloat16)]
DEFAULT_MODEL_APPROXIMATE = [(0.6, 1.0), (0.5, 1.0), (0.6, 0.5), (0.6, 0.25), (0.3, 0.1)]


def grid_subset(stride, grid):
    """Indices (in Captum's enumeration) and corners of a grid x grid spread of windows."""
    positions = _window_positions(SIZE, SIZE, WINDOW, (stride, stride))
    tops, lefts = positions[:, 0].unique(), positions[:, 1].unique()
    pick_t = tops[torch.linspace(0, len(tops) - 1, grid).round().long()]
    pick_l = lefts[torch.linspace(0, len(lefts) - 1, grid).round().long()]
    ids = torch.tensor([i for i, (t, l) in enumerate(positions.tolist()) if t in pick_t and l in pick_l])
    return ids, positions[ids]


def full_reinference(model, x, target, positions, batch=16, layout=torch.contiguous_format):
    """What a user writes without a library: per chunk, masks, blended copies, one forward.
    ``layout=torch.channels_last``: the copies in the layout oneDNN prefers on CPU (VGG16
    1.4x faster here), the strongest plain-PyTorch baseline."""
    H, W = x.shape[-2:]
    rows, cols = torch.arange(H), torch.arange(W)
    clean = model(x)[0, target]
    drops = []
    for s in range(0, len(positions), batch):
        pos = positions[s:s + batch]
        m = (((rows >= pos[:, :1]) & (rows < pos[:, :1] + WINDOW[0]))[:, :, None]
             & ((cols >= pos[:, 1:]) & (cols < pos[:, 1:] + WINDOW[1]))[:, None, :])[:, None].float()
        drops.append(clean - model((x * (1 - m)).contiguous(memory_format=layout))[:, target])
    return torch.cat(drops)


class SubsetOcclusion(Occlusion):
    """Captum's Occlusion restricted to some of its windows (its own masks and batching)."""

    def __init__(self, forward_func, feature_ids):
        super().__init__(forward_func)
        self.feature_ids = feature_ids

    def _get_feature_idx_to_tensor_idx(self, formatted_feature_mask, **kwargs):
        every = super()._get_feature_idx_to_tensor_idx(formatted_feature_mask, **kwargs)
        return {i: every[i] for i in self.feature_ids}


def ssim(a, b):
    """SSIM (Wang et al. 2004: gaussian window, sigma 1.5) of two maps min-max scaled to [0, 1]."""
    a, b = (minmax_normalize_ref(m.double()).numpy() for m in (a, b))
    return float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def sweep_rows(table, name, model, x, target, stride, grid):
    """The sweep providers on a grid of positions."""
    ids, positions = grid_subset(stride, grid)
    n = len(ids)
    case = f"{name} s{stride} {n}pos"
    zeros = torch.zeros(n, dtype=torch.long)
    exact = _Sweep(model, x, target, WINDOW, 0.0).drops(zeros, positions)[:, 0]
    torch.testing.assert_close(exact, full_reinference(model, x, target, positions), rtol=1e-4, atol=1e-4)
    incremental = _Sweep(model, x, target, WINDOW, 0.0, incremental=True).drops(zeros, positions)[:, 0]
    span = (exact.max() - exact.min()).item()
    assert (incremental - exact).abs().max() <= 1e-4 * span, "incremental differs from exact"
    # Each provider's time includes its set-up: one clean forward pass, or for incremental the
    # trace and the clean pass that keeps every activation. A map pays it once for all its
    # windows, so the per-window costs leave it out.
    clean_ms = measure(lambda: model(x), min_run_time=0.5)[0]
    setup_ms = measure(lambda: incremental_engine(model, x[0]), min_run_time=0.5)[0]

    def add(provider, fn, setup, **extra):
        row = table.add(case, provider, fn, min_run_time=0.1, positions=n, setup_ms=setup, **extra)
        row["ms/pos"] = row["p50_ms"] / n
        row["window_ms"] = (row["p50_ms"] - setup) / n
        return row

    full = add("full re-inference b16", lambda: full_reinference(model, x, target, positions), clean_ms)
    rows = [full, add("full re-inference b16 channels-last", lambda: full_reinference(
        model, x, target, positions, layout=torch.channels_last), clean_ms)]
    for ppe in (1, 16, 64):
        captum = SubsetOcclusion(model, ids.tolist())
        rows.append(add(f"captum ppe={ppe}", lambda: captum.attribute(
            x, target=target, sliding_window_shapes=(3, *WINDOW), strides=(3, stride, stride),
            perturbations_per_eval=ppe), clean_ms))
    rows.append(add("cnnviz exact", lambda: _Sweep(model, x, target, WINDOW, 0.0).drops(zeros, positions), clean_ms))
    every = _window_positions(SIZE, SIZE, WINDOW, (stride, stride))
    theory = theoretical_flop_ratio(model, tuple(x.shape[1:]), positions, WINDOW)
    row = add("cnnviz incremental",
              lambda: _Sweep(model, x, target, WINDOW, 0.0, incremental=True).drops(zeros, positions), setup_ms,
              theory_x=theory, theory_all_x=theoretical_flop_ratio(model, tuple(x.shape[1:]), every, WINDOW))
    rows.append(row)
    for r in rows:
        r["per_window_x"] = full["window_ms"] / r["window_ms"]
        r["per_window_vs_channels_last"] = rows[1]["window_ms"] / r["window_ms"]
    row["of_theory"] = row["per_window_x"] / theory
    row["of_theory_channels_last"] = row["per_window_vs_channels_last"] / theory


def map_rows(table, name, model, x, target, stride):
    """Whole maps, every window of the stride: full re-inference (the baseline, one run),
    exact by incremental inference (the SSIM reference), then the approximate settings."""
    case = f"{name} s{stride} full map"
    every = _window_positions(SIZE, SIZE, WINDOW, (stride, stride))
    n, maps = len(every), {}
    table.add(case, "full re-inference b16", lambda: full_reinference(model, x, target, every), once=True, positions=n)
    channels_last = table.add(case, "full re-inference b16 channels-last", lambda: full_reinference(
        model, x, target, every, layout=torch.channels_last), once=True, positions=n)

    def add(provider, **kw):
        def run():
            maps[provider] = occlusion(model, x, target, WINDOW, stride, **kw)
        row = table.add(case, provider, run, min_run_time=0.1, positions=n)
        row["ms/pos"] = row["p50_ms"] / n
        row["vs_channels_last"] = channels_last["p50_ms"] / row["p50_ms"]
        row["ssim"] = ssim(maps[provider][0], maps["cnnviz incremental"][0])
        return row

    theory = theoretical_flop_ratio(model, tuple(x.shape[1:]), every, WINDOW)
    row = add("cnnviz incremental", mode="incremental")
    row.update(theory_x=theory, of_theory=row["vs_baseline"] / theory,
               of_theory_channels_last=row["vs_channels_last"] / theory)
    exact_map = occlusion(model, x, target, WINDOW, stride, mode="exact")
    span = (exact_map.max() - exact_map.min()).item()
    assert (maps["cnnviz incremental"] - exact_map).abs().max() <= 1e-4 * span, "incremental map differs"
    for tau, r, dtype in APPROXIMATE:
        row = add(f"approx {'bf16 ' if dtype is torch.bfloat16 else ''}tau={tau} r={r}", mode="approximate",
                  tau=tau, refine_fraction=r, coarse_stride=WINDOW, compute_dtype=dtype)
        row.update(tau=tau, refine=r)


def default_model_rows(table, n=16):
    """The approximations on a trained network: the embedded default model on ``n`` held-out
    shapes images (64 px, window 8, stride 4, coarse stride 8), mean SSIM against exact."""
    model, shapes = models.shapes_cnn().eval(), data.shapes(n, size=64, seed=3)
    x, target = shapes.images, shapes.labels
    case, maps = f"shapes_cnn 64px s4 {n} images", {}

    def add(provider, **kw):
        def run():
            maps[provider] = occlusion(model, x, target, 8, 4, **kw)
        row = table.add(case, provider, run, min_run_time=0.5, images=n)
        row["ssim"] = sum(ssim(a, b) for a, b in zip(maps[provider], maps["cnnviz exact"])) / n
        return row

    add("cnnviz exact", mode="exact")
    add("cnnviz incremental", mode="incremental")
    for tau, r in DEFAULT_MODEL_APPROXIMATE:
        add(f"approx tau={tau} r={r}", mode="approximate", tau=tau, refine_fraction=r,
            coarse_stride=8).update(tau=tau, refine=r)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vgg16,resnet18")
    parser.add_argument("--strides", default="8,4")
    parser.add_argument("--grid", type=int, default=4, help="grid x grid window positions per sweep row")
    parser.add_argument("--map-strides", default="8", help="strides of the full-map (approximate) rows")
    parser.add_argument("--threads", default="1", help="torch and OpenMP threads (pass as --threads=N)")
    args = parser.parse_args()
    torch.set_num_threads(int(args.threads))
    table = BenchTable("occlusion", "cpu", size=SIZE, window=WINDOW, grid=args.grid, weights="random",
                       omp_threads=os.environ["OMP_NUM_THREADS"])
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(models, name)().eval()
        x = torch.rand(1, 3, SIZE, SIZE)
        with torch.no_grad():
            target = int(model(x).argmax())
            for stride in map(int, args.strides.split(",")):
                sweep_rows(table, name, model, x, target, stride, args.grid)
            for stride in map(int, args.map_strides.split(",")):
                map_rows(table, name, model, x, target, stride)
    default_model_rows(table)
    table.report(f"sweep rows: {args.grid}x{args.grid} window positions, p50 includes the set-up (setup_ms: "
                 f"one clean forward, or the incremental trace + clean pass), window_ms = (p50 - setup) / "
                 f"positions, per_window_x = full re-inference window_ms / row window_ms, of_theory = "
                 f"per_window_x / theory_x; full-map rows: every window, speedup vs full re-inference "
                 f"(one run), of_theory = speedup / theory_x, vs_channels_last = speedup vs full re-inference on "
                 f"channels-last copies (one run), ssim vs the exact map; shapes_cnn rows: trained "
                 f"default model, mean ssim over the images vs exact; {args.threads} thread(s)")


if __name__ == "__main__":
    main()
