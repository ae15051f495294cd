"""Synthesis on this CPU: class visualization batched (all classes of a call in one batch, as
cnnviz-fast runs it) against one objective at a time (Lucent's way: one ``render_vis`` per
objective), Lucent itself where importable; the ``gram`` op, C++ against the reference; and the
feature-inversion error by depth (the README table).

    flock /tmp/cnnviz-bench.lock python3 benchmarks/bench_synthesis.py
    python3 benchmarks/bench_synthesis.py --quick     # fewer steps, no VGG16 inversion
    python3 benchmarks/bench_synthesis.py --gram-only # the gram rows alone

Class visualization: Fourier parametrization, decorrelated colour, Adam lr 0.05; rows
``transforms=None`` (so Lucent, whose standard transforms need kornia, runs the same work:
``transforms=[]``, ``preprocess=False``, ``fixed_image_size`` = the size, and the torchvision
and kornia stand-ins of ``tests/_peers.py``) and ``transforms="standard"`` (cnnviz only);
the redirected ReLU off (``redirected_relu_steps=0``: Lucent has none).
Models: the embedded default model (6 classes, 64 px) and VGG16 with random weights (16
classes, 32 px, 2 steps). Default-model rows: median of repeated runs (torch Timer, >= 4 s each); VGG16 rows:
single runs (a run lasts seconds). Inversion: 4 shapes images at
64 px on the default model, 2 at 32 px on VGG16, no TV, Adam lr 0.1. The synthesis rows run torch on ``--threads`` (default 1: on a CPU shared by
more processes than cores, two threads make every small operator wait for a descheduled
partner); the gram rows alternate reference and C++ call by call (``add_interleaved``) on the
default threads and on one. Each JSON records ``os.getloadavg()``.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from _runner import BenchTable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cnnviz_fast as cf  # noqa: E402
from cnnviz_fast.data import shapes  # noqa: E402
from cnnviz_fast.models import shapes_cnn, vgg16  # noqa: E402
from cnnviz_fast.reference import gram_ref  # noqa: E402


def lucent_or_none():
    from tests._peers import import_lucent
    try:
        return import_lucent()
    except Exception as err:  # a peer that fails to import is reported, not fatal
        print(f"lucent not importable: {err}")
        return None


def class_rows(table, name, model, classes, size, steps, lucent, once):
    case = f"{name} {len(classes)} classes {size}px {steps} steps"
    timing = dict(once=True) if once else dict(min_run_time=4)

    def batched(transforms=None):
        return cf.class_visualization(model, classes, size=size, steps=steps, transforms=transforms,
                                      redirected_relu_steps=0)

    def one_at_a_time(transforms=None):
        return [cf.class_visualization(model, c, size=size, steps=steps, transforms=transforms,
                                       redirected_relu_steps=0) for c in classes]

    # correctness once: the batch follows the same per-image objective (logits rise)
    trace = batched().trace
    assert bool((trace[-1] > trace[0]).all()), "class logits did not rise"
    table.add(case, "one at a time (cnnviz)", one_at_a_time, **timing, transforms="none")
    if lucent is not None:
        render, param, objectives = lucent
        head = [n for n, _ in model.named_children()][-1]

        def lucent_each():
            for c in classes:
                render.render_vis(model, objectives.channel(head, c), lambda: param.image(size),
                                  transforms=[], preprocess=False, thresholds=(steps,), show_image=False,
                                  progress=False, fixed_image_size=size)
        table.add(case, "one at a time (Lucent)", lucent_each, **timing, transforms="none")
    table.add(case, "batched (cnnviz)", batched, baseline=False, **timing, transforms="none")
    std_case = case + " standard transforms"
    table.add(std_case, "one at a time (cnnviz)", lambda: one_at_a_time("standard"), **timing, transforms="standard")
    table.add(std_case, "batched (cnnviz)", lambda: batched("standard"), **timing, transforms="standard")


def inversion_table(model, name, x, layers, steps):
    rows = []
    for layer in layers:
        result = cf.feature_inversion(model, x, layer, tv_weight=0.0, steps=steps, lr=0.1)
        err = ((result.images - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean().item()
        rows.append(dict(model=name, layer=layer, image_error=err, feature_loss=result.trace[-1].mean().item()))
        print(f"  inversion {name:<12} {layer:<12} image error {err:.3f}  feature loss {rows[-1]['feature_loss']:.4f}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gram-only", action="store_true", help="only the gram rows (about 20 s)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()

    # gram: C++ against the reference at (8, 512, 28, 28), forward and forward + backward,
    # interleaved, on the default threads and on one
    from cnnviz_fast._backend import cpp_module
    # whether the C++ kernel found the sgemm_ torch loaded (else it runs its plain loop)
    table = BenchTable("gram", loadavg=os.getloadavg(), cpp_uses_blas=cpp_module().gram_uses_blas())
    x = torch.randn(8, 512, 28, 28)
    torch.testing.assert_close(cf.gram(x, backend="cpp"), gram_ref(x), rtol=1e-4, atol=1e-7)
    xg = x.clone().requires_grad_(True)
    upstream = torch.randn(8, 512, 512)
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        table.add_interleaved(f"forward (8,512,28,28) {threads}T",
                              {b: lambda b=b: cf.gram(x, backend=b) for b in ("reference", "cpp")}, repeats=40)
        table.add_interleaved(f"fwd+bwd (8,512,28,28) {threads}T",
                              {b: lambda b=b: cf.gram(xg, backend=b).backward(upstream) for b in ("reference", "cpp")},
                              repeats=20)
    torch.set_num_threads(default_threads)
    table.meta.update(loadavg_end=os.getloadavg())
    table.report(note=f"interleaved, threads per row, loadavg {os.getloadavg()}; shared CPU")
    if args.gram_only:
        return

    torch.set_num_threads(args.threads)
    lucent = lucent_or_none()
    steps = 8 if args.quick else 16
    table = BenchTable("synthesis", loadavg_start=os.getloadavg(), threads=args.threads)
    class_rows(table, "shapes_cnn", shapes_cnn(), list(range(6)), 64, steps, lucent, once=False)
    torch.manual_seed(0)
    vgg = vgg16().eval()
    class_rows(table, "vgg16(random)", vgg, list(range(0, 1000, 63))[:16], 32, 2, lucent, once=True)

    inv_steps = 40 if args.quick else 100
    images = shapes(4, size=64, seed=5).images
    inversion = inversion_table(shapes_cnn(), "shapes_cnn", images,
                                ["features.2", "features.5", "features.8", "features.11", "features.14", "features.17"],
                                inv_steps)
    if not args.quick:
        inversion += inversion_table(vgg, "vgg16(random)", shapes(2, size=32, seed=5).images,
                                     ["features.3", "features.8", "features.15", "features.22", "features.29"], inv_steps)
    table.meta.update(inversion=inversion, inversion_steps=inv_steps, loadavg_end=os.getloadavg())
    table.report(note=f"{args.threads} thread(s), loadavg {os.getloadavg()}; shared CPU")


if __name__ == "__main__":
    main()
