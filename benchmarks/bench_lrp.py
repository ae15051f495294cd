"""lrp against zennit (same composite, same canonizers) and the autograd floor, on this CPU.

The floor is one forward pass plus one input-gradient backward pass, nothing else.

    PYTHONPATH=. python benchmarks/bench_lrp.py
"""
import torch

from _runner import BenchTable
from cnnviz_fast import lrp, models
from tests._peers import import_zennit

CASES = [("vgg16", 4), ("resnet50", 8)]
SIZE = 224
TARGET = 1


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


def main():
    torch.manual_seed(0)
    zennit = import_zennit()
    table = BenchTable("lrp", "cpu", dtype="float32", size=SIZE, threads=torch.get_num_threads())
    low, high = torch.full((1, 3, 1, 1), -2.2), torch.full((1, 3, 1, 1), 2.7)
    for name, batch in CASES:
        model = getattr(models, name)().eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the floor computes no parameter gradients either
        x = torch.randn(batch, 3, SIZE, SIZE).clamp(-2.2, 2.7)
        case = f"{name} b{batch}"
        table.add(case, "autograd floor", lambda: _floor(model, x), min_run_time=0.5)
        composites = _composites(zennit, name, low, high) if zennit is not None else {}
        for rules in ("epsilon_plus_flat", "epsilon_gamma_box"):
            ours = lrp(model, x, TARGET, rules, low=low, high=high)
            err = None
            if rules in composites:  # check correctness once before timing
                ref = _zennit(zennit, model, x, composites[rules])
                err = ((ours - ref).abs().max() / ref.abs().max()).item()
                # float32 with random weights: both libraries round differently near z ~ 0
                # (tests/test_lrp.py checks exactness in float64); 1e-3 catches real defects.
                assert err <= 1e-3, f"{case} {rules}: error {err:.3g} of the relevance scale"
            row = table.add(case, f"cnnviz lrp {rules}", lambda: lrp(model, x, TARGET, rules, low=low, high=high),
                            min_run_time=0.5, err_vs_zennit=err)
            if rules in composites:
                zrow = table.add(case, f"zennit {rules}", lambda: _zennit(zennit, model, x, composites[rules]),
                                 min_run_time=0.5)
                row["vs_zennit"] = zrow["p50_ms"] / row["p50_ms"]
    table.report("vs_baseline = floor time / this time (below 1 is slower than the floor); "
                 "vs_zennit = zennit time / cnnviz time. Shared 2-core CPU: timings are noisy.")


if __name__ == "__main__":
    main()
