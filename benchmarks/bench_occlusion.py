"""Occlusion: full re-inference (batched), Captum's Occlusion at perturbations_per_eval 1, 16
and 64, and cnnviz-fast exact / incremental / approximate, side by side in one run.

224x224 inputs, window 16, strides 8 and 4, random weights (vgg16, resnet18). A full map is
729 (stride 8) or 2809 (stride 4) forward passes, minutes per provider on a small CPU, so the
sweep providers are timed on a fixed subset of window positions: a grid of ``--grid`` x
``--grid`` (top, left) corners spread evenly over the stride's corners, borders included.
Every provider's time includes one clean forward pass; ``ms/pos`` is its p50 divided by the
number of positions. The approximate mode (a global drill-down) is timed on full maps against
the exact full map, which is also the reference of its SSIM (models in ``--ssim-models``).

    PYTHONPATH=. python benchmarks/bench_occlusion.py [--grid 8] [--ssim-models resnet18]
"""
import argparse
import importlib.util

import torch
from skimage.metrics import structural_similarity

from _runner import BenchTable
from captum.attr import Occlusion
from cnnviz_fast import models, occlusion
from cnnviz_fast.explain.occlusion import _Sweep, _window_positions
from cnnviz_fast.reference.upsample import minmax_normalize_ref

SIZE, WINDOW = 224, (16, 16)
HAS_INCREMENTAL = importlib.util.find_spec("cnnviz_fast.explain._incremental") is not None
# (tau, refine_fraction) of the approximate rows; tau=None evaluates windows by full inference
APPROXIMATE = [(None, 0.25), (None, 0.1)] + ([(1.0, 0.25), (0.5, 0.25), (0.5, 0.1), (0.3, 0.1)]
                                              if HAS_INCREMENTAL else [])


def grid_subset(stride, grid):
    """Indices (in Captum's enumeration) and corners of a grid x grid spread of windows."""
    positions = _window_positions(SIZE, SIZE, WINDOW, (stride, stride))
    tops, lefts = positions[:, 0].unique(), positions[:, 1].unique()
    pick_t = tops[torch.linspace(0, len(tops) - 1, grid).round().long()]
    pick_l = lefts[torch.linspace(0, len(lefts) - 1, grid).round().long()]
    ids = torch.tensor([i for i, (t, l) in enumerate(positions.tolist()) if t in pick_t and l in pick_l])
    return ids, positions[ids]


def full_reinference(model, x, target, positions, batch=16):
    """What a user writes without a library: per chunk, masks, blended copies, one forward."""
    H, W = x.shape[-2:]
    rows, cols = torch.arange(H), torch.arange(W)
    clean = model(x)[0, target]
    drops = []
    for s in range(0, len(positions), batch):
        pos = positions[s:s + batch]
        m = (((rows >= pos[:, :1]) & (rows < pos[:, :1] + WINDOW[0]))[:, :, None]
             & ((cols >= pos[:, 1:]) & (cols < pos[:, 1:] + WINDOW[1]))[:, None, :])[:, None].float()
        drops.append(clean - model(x * (1 - m))[:, target])
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
    ids, positions = grid_subset(stride, grid)
    n = len(ids)
    case = f"{name} s{stride} {n}pos"
    zeros = torch.zeros(n, dtype=torch.long)
    exact = _Sweep(model, x, target, WINDOW, 0.0).drops(zeros, positions)[:, 0]
    torch.testing.assert_close(exact, full_reinference(model, x, target, positions), rtol=1e-4, atol=1e-4)

    def add(provider, fn, **extra):
        row = table.add(case, provider, fn, min_run_time=0.1, positions=n, **extra)
        row["ms/pos"] = row["p50_ms"] / n

    add("full re-inference b16", lambda: full_reinference(model, x, target, positions))
    for ppe in (1, 16, 64):
        captum = SubsetOcclusion(model, ids.tolist())
        add(f"captum ppe={ppe}", lambda: captum.attribute(
            x, target=target, sliding_window_shapes=(3, *WINDOW), strides=(3, stride, stride),
            perturbations_per_eval=ppe))
    add("cnnviz exact", lambda: _Sweep(model, x, target, WINDOW, 0.0).drops(zeros, positions))
    if HAS_INCREMENTAL:
        from cnnviz_fast.explain._incremental import theoretical_flop_ratio
        every = _window_positions(SIZE, SIZE, WINDOW, (stride, stride))
        add("cnnviz incremental",
            lambda: _Sweep(model, x, target, WINDOW, 0.0, incremental=True).drops(zeros, positions),
            theory_x=theoretical_flop_ratio(model, tuple(x.shape[1:]), positions, WINDOW),
            theory_all_x=theoretical_flop_ratio(model, tuple(x.shape[1:]), every, WINDOW))


def map_rows(table, name, model, x, target, stride):
    case = f"{name} s{stride} full map"
    n = len(_window_positions(SIZE, SIZE, WINDOW, (stride, stride)))
    exact = occlusion(model, x, target, WINDOW, stride)

    def add(provider, fn, result, **extra):
        row = table.add(case, provider, fn, min_run_time=0.1, positions=n, ssim=ssim(result[0], exact[0]), **extra)
        row["ms/pos"] = row["p50_ms"] / n

    add("cnnviz exact", lambda: occlusion(model, x, target, WINDOW, stride), exact)
    for tau, r in APPROXIMATE:
        kw = dict(mode="approximate", tau=tau, refine_fraction=r)
        add(f"approx tau={tau} r={r}", lambda: occlusion(model, x, target, WINDOW, stride, **kw),
            occlusion(model, x, target, WINDOW, stride, **kw), tau=tau, refine=r)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vgg16,resnet18")
    parser.add_argument("--strides", default="8,4")
    parser.add_argument("--grid", type=int, default=8, help="grid x grid window positions per sweep row")
    parser.add_argument("--ssim-models", default="resnet18", help="models whose full maps are computed")
    parser.add_argument("--ssim-strides", default="8")
    args = parser.parse_args()
    table = BenchTable("occlusion", "cpu", size=SIZE, window=WINDOW, grid=args.grid, weights="random",
                       incremental_available=HAS_INCREMENTAL)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(models, name)().eval()
        x = torch.rand(1, 3, SIZE, SIZE)
        with torch.no_grad():
            target = int(model(x).argmax())
            for stride in map(int, args.strides.split(",")):
                sweep_rows(table, name, model, x, target, stride, args.grid)
            if name in args.ssim_models.split(","):
                for stride in map(int, args.ssim_strides.split(",")):
                    map_rows(table, name, model, x, target, stride)
    note = (f"sweep rows: {args.grid}x{args.grid} window positions per row, p50 includes one clean forward; "
            f"ms/pos = p50 / positions; full-map rows: speedup vs cnnviz exact full map, ssim vs it; "
            f"shared 2-core CPU, noisy")
    if not HAS_INCREMENTAL:
        note += "; incremental rows pending (cnnviz_fast.explain._incremental not merged)"
    table.report(note)


if __name__ == "__main__":
    main()
