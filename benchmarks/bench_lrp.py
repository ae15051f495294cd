"""lrp against zennit (same composite, same canonizers) and the autograd floor, on this CPU.

The floor is one forward pass plus one input-gradient backward pass, nothing else. Ours runs
by default (on CPU: a channels-last copy with batch norms folded) and with
``compute_dtype=torch.bfloat16``; the bfloat16 rows carry their fidelity against our float32
maps (relevance summed over channels): per-map Spearman rank correlation and top-10% pixel IoU,
on the timed random-weight inputs, and in ``meta.fidelity`` on the trained default model
(shapes_cnn, 16 images at 64 px).

    PYTHONPATH=. python benchmarks/bench_lrp.py
"""
import copy
import os

import torch

from _runner import BenchTable
from cnnviz_fast import lrp, models
from cnnviz_fast._precision import fidelity
from cnnviz_fast.data import shapes
from tests._peers import import_zennit

CASES = [("vgg16", 4), ("resnet50", 8)]
SIZE = 224
TARGET = 1
MIN_RUN_TIME = 10.0  # seconds per provider: a few runs of these multi-second calls


def _floor(model, x):
    xi = x.detach().requires_grad_(True)
    torch.autograd.grad(model(xi)[:, TARGET].sum(), xi)


def _zennit(zennit, model, x, composite):
    with composite.context(model) as modified:
        xi = x.detach().requires_grad_(True)
        out = modified(xi)
        seed = torch.zeros_like(out)
        seed[:, TARGET] = out[:, TARGET].detach()
        return torch.autograd.grad(out, xi, seed)[0]


def _composites(zennit, name, low, high):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer
    canon = (lambda: [ResNetCanonizer()]) if name.startswith("resnet") else (lambda: [SequentialMergeBatchNorm()])
    return {"epsilon_plus_flat": EpsilonPlusFlat(canonizers=canon()),
            "epsilon_gamma_box": EpsilonGammaBox(low=low, high=high, canonizers=canon())}


def _check_float64(zennit, name, model, x, rules, low, high):
    """Same algorithm as zennit: float64 copies, one image, agree to 1e-9 of the relevance scale."""
    model64, x64 = copy.deepcopy(model).double(), x[:1].double()
    low64, high64 = low.double(), high.double()
    ours = lrp(model64, x64, TARGET, rules, low=low64, high=high64)
    ref = _zennit(zennit, model64, x64, _composites(zennit, name, low64, high64)[rules])
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-9, f"{name} {rules} float64: error {err:.3g} of the relevance scale"


def _fidelity(model, x, rules, target=TARGET, **kwargs):
    """Spearman / top-10% IoU of the bfloat16 relevance maps against float32 (summed over channels)."""
    ref = lrp(model, x, target, rules, **kwargs).sum(1)
    spearman, iou = fidelity(lrp(model, x, target, rules, compute_dtype=torch.bfloat16, **kwargs).sum(1), ref)
    return dict(spearman_mean=float(spearman.mean()), spearman_min=float(spearman.min()),
                iou_top10_mean=float(iou.mean()))


def trained_fidelity():
    """The bfloat16 fidelity on the trained default model, per composite."""
    data = shapes(16, size=64, seed=7)
    model = models.shapes_cnn().eval()
    rows = []
    for rules in ("epsilon_plus_flat", "epsilon_gamma_box"):
        bounds = dict(low=torch.zeros(1, 3, 1, 1), high=torch.ones(1, 3, 1, 1)) if rules == "epsilon_gamma_box" else {}
        row = dict(model="shapes_cnn (trained)", rules=rules, **_fidelity(model, data.images, rules, data.labels,
                                                                          **bounds))
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def main():
    torch.manual_seed(0)
    zennit = import_zennit()
    table = BenchTable("lrp", "cpu", dtype="float32 (bfloat16 rows: compute_dtype)", size=SIZE,
                       threads=torch.get_num_threads(), loadavg_start=os.getloadavg())
    print("fidelity of bfloat16 against float32 maps, trained default model")
    table.meta["fidelity"] = trained_fidelity()
    low, high = torch.full((1, 3, 1, 1), -2.2), torch.full((1, 3, 1, 1), 2.7)
    for name, batch in CASES:
        model = getattr(models, name)().eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the floor computes no parameter gradients either
        x = torch.randn(batch, 3, SIZE, SIZE).clamp(-2.2, 2.7)
        case = f"{name} b{batch}"
        _floor(model, x)  # warm-up: the other providers are warmed by the correctness check
        table.add(case, "autograd floor", lambda: _floor(model, x), min_run_time=MIN_RUN_TIME)
        composites = _composites(zennit, name, low, high) if zennit is not None else {}
        for rules in ("epsilon_plus_flat", "epsilon_gamma_box"):
            err = None
            if rules in composites:  # check correctness once before timing
                _check_float64(zennit, name, model, x, rules, low, high)
                ours, ref = lrp(model, x, TARGET, rules, low=low, high=high), _zennit(zennit, model, x, composites[rules])
                # float32, random weights: the two round differently where z ~ 0 (reported, not checked)
                err = ((ours - ref).abs().max() / ref.abs().max()).item()
            row = table.add(case, f"cnnviz lrp {rules}", lambda: lrp(model, x, TARGET, rules, low=low, high=high),
                            min_run_time=MIN_RUN_TIME, err_vs_zennit=err)
            low_row = table.add(case, f"cnnviz lrp {rules} bfloat16",
                                lambda: lrp(model, x, TARGET, rules, low=low, high=high, compute_dtype=torch.bfloat16),
                                min_run_time=MIN_RUN_TIME, **_fidelity(model, x, rules, low=low, high=high))
            if rules in composites:
                zrow = table.add(case, f"zennit {rules}", lambda: _zennit(zennit, model, x, composites[rules]),
                                 min_run_time=MIN_RUN_TIME)
                row["vs_zennit"] = zrow["p50_ms"] / row["p50_ms"]
                low_row["vs_zennit"] = zrow["p50_ms"] / low_row["p50_ms"]
    table.meta["loadavg_end"] = os.getloadavg()
    table.report("vs_baseline = floor time / this time (below 1 is slower than the floor); "
                 "vs_zennit = zennit time / cnnviz time. Shared 2-core CPU: timings are noisy.")


if __name__ == "__main__":
    main()
