"""Gradient attributions on resnet50 (random weights) side by side in one run: the autograd
floor (the same forward passes plus one input-gradient backward, nothing else), Captum, and
cnnviz_fast in float32, float32 channels-last and ``compute_dtype=torch.bfloat16``. Ratios are
against the floor (``vs_captum``: Captum's time over ours); a method at 1.00x costs nothing
beyond its gradients. Then the fidelity of the bfloat16 maps against the float32 maps
(``to_map``'s max |attribution| over channels): per-map Spearman rank correlation and top-10%
pixel IoU, on the trained default model (shapes_cnn, 64 px) and on VGG16 / ResNet-50 (random
weights, ``--fid-size`` px, ``--fid-batch`` images: smaller than the timing runs, to keep the
run within a few minutes).

    PYTHONPATH=. python benchmarks/bench_gradients.py [--size 224] [--batch 8] [--steps 50]

Captum gets the same rows per pass as ours (``internal_batch_size`` / ``nt_samples_batch_size``)
so both hold the same memory; the floor runs the same chunks.
"""
import argparse
import functools
import os
import warnings

import torch
from captum import attr as captum_attr

from _runner import BenchTable
from cnnviz_fast import deconvnet, deeplift, guided_backprop, integrated_gradients, saliency, smoothgrad, to_map
from cnnviz_fast._precision import fidelity
from cnnviz_fast.data import shapes
from cnnviz_fast.explain.gradients import _row_chunks
from cnnviz_fast.models import resnet50, shapes_cnn, vgg16
from tests.test_gradients import assert_attr_close, unique_relus


def floor(model, inputs, target, chunk):
    """Input gradients of the target scores over ``inputs`` in ``chunk`` rows per pass."""
    for part in inputs.split(chunk):
        part = part.detach().requires_grad_(True)
        scores = model(part)[:, target].sum()
        torch.autograd.grad(scores, part)


def captum(cls, model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(*args, **kwargs)


# the providers of our rows: (name, keywords)
VARIANTS = [("cnnviz_fast", {}), ("cnnviz_fast channels_last", {"channels_last": True}),
            ("cnnviz_fast bfloat16", {"compute_dtype": torch.bfloat16})]


def fidelity_rows(steps, fid_size, fid_batch):
    """Spearman / top-10% IoU of bfloat16 against float32 maps, per method and model."""
    methods = {
        "saliency": saliency, "guided_backprop": guided_backprop, "deconvnet": deconvnet, "deeplift": deeplift,
        "integrated_gradients": functools.partial(integrated_gradients, steps=steps),
        "smoothgrad": lambda m, x, t, **k: smoothgrad(m, x, t, n_samples=steps,
                                                      generator=torch.Generator().manual_seed(0), **k),
    }
    data = shapes(16, size=64, seed=7)
    torch.manual_seed(0)
    big = torch.rand(fid_batch, 3, fid_size, fid_size)
    models = [("shapes_cnn (trained)", shapes_cnn().eval(), data.images, data.labels),
              ("vgg16 (random)", vgg16().eval(), big, 3), ("resnet50 (random)", resnet50().eval(), big, 3)]
    rows = []
    for model_name, model, x, t in models:
        for name, method in methods.items():
            ref = to_map(method(model, x, t))
            spearman, iou = fidelity(to_map(method(model, x, t, compute_dtype=torch.bfloat16)), ref)
            rows.append(dict(model=model_name, method=name, spearman_mean=float(spearman.mean()),
                             spearman_min=float(spearman.min()), iou_top10_mean=float(iou.mean()), maps=len(iou)))
            print(f"  {model_name:<22} {name:<22} spearman mean {spearman.mean():.4f} min {spearman.min():.4f}  "
                  f"top-10% IoU {iou.mean():.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="batch of saliency, guided backprop, DeepLIFT")
    parser.add_argument("--steps", type=int, default=50, help="IG steps and SmoothGrad samples (1 image)")
    parser.add_argument("--fid-size", type=int, default=112, help="image size of the random-weight fidelity runs")
    parser.add_argument("--fid-batch", type=int, default=4, help="images of the random-weight fidelity runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50().eval()
    for p in model.parameters():  # as a user's model: parameters require grad, we must not compute them
        p.requires_grad_(True)
    peer_model = unique_relus(model)  # Captum's DeepLift needs one ReLU module per call
    x = torch.rand(args.batch, 3, args.size, args.size)
    one = x[:1]
    t = 3
    steps = args.steps
    chunks = _row_chunks(model, one, steps, None, None, "gradient")  # the rows per pass our IG chooses
    next(chunks)
    floor(model, one, t, 1)
    chunk = len(range(*next(chunks)))
    table = BenchTable("gradients", "cpu", model="resnet50", size=args.size, batch=args.batch, steps=steps,
                       rows_per_pass=chunk, dtype="float32 (cnnviz_fast bfloat16 rows: compute_dtype)",
                       loadavg_start=os.getloadavg())

    # correctness once, on the benchmark model (SmoothGrad: 4 samples, the same noise)
    assert_attr_close(saliency(model, x[:2], t), captum(captum_attr.Saliency, model, x[:2], target=t))
    assert_attr_close(guided_backprop(model, x[:2], t), captum(captum_attr.GuidedBackprop, model, x[:2], target=t))
    assert_attr_close(deeplift(model, x[:2], t), captum(captum_attr.DeepLift, peer_model, x[:2], target=t))
    assert_attr_close(integrated_gradients(model, one, t, steps=4, method="gausslegendre"),
                      captum(captum_attr.IntegratedGradients, model, one, target=t, n_steps=4))
    torch.manual_seed(5)
    ref = captum(captum_attr.NoiseTunnel, captum_attr.Saliency(model), one, nt_type="smoothgrad", nt_samples=4,
                 stdevs=0.15 * float(one.max() - one.min()), target=t)
    assert_attr_close(smoothgrad(model, one, t, n_samples=4, generator=torch.Generator().manual_seed(5)), ref)

    batch = f"batch {args.batch}"
    doubled = torch.cat([x, torch.zeros_like(x)])
    path = one.expand(steps, -1, -1, -1)
    cases = [
        (f"saliency {batch}", lambda: floor(model, x, t, len(x)),
         lambda: captum(captum_attr.Saliency, model, x, target=t), lambda **k: saliency(model, x, t, **k)),
        (f"guided_backprop {batch}", lambda: floor(model, x, t, len(x)),
         lambda: captum(captum_attr.GuidedBackprop, model, x, target=t),
         lambda **k: guided_backprop(model, x, t, **k)),
        (f"deeplift {batch}", lambda: floor(model, doubled, t, len(doubled)),
         lambda: captum(captum_attr.DeepLift, peer_model, x, target=t), lambda **k: deeplift(model, x, t, **k)),
        (f"integrated_gradients {steps} steps", lambda: floor(model, path, t, chunk),
         lambda: captum(captum_attr.IntegratedGradients, model, one, target=t, n_steps=steps,
                        method="gausslegendre", internal_batch_size=chunk),
         lambda **k: integrated_gradients(model, one, t, steps=steps, method="gausslegendre", **k)),
        (f"smoothgrad {steps} samples", lambda: floor(model, path, t, chunk),
         lambda: captum(captum_attr.NoiseTunnel, captum_attr.Saliency(model), one, nt_type="smoothgrad",
                        nt_samples=steps, nt_samples_batch_size=chunk, stdevs=0.15, target=t),
         lambda **k: smoothgrad(model, one, t, n_samples=steps, **k)),
    ]
    for case, floor_fn, captum_fn, ours_fn in cases:
        table.add(case, "floor (autograd)", floor_fn)
        captum_row = table.add(case, "captum", captum_fn)
        for provider, kwargs in VARIANTS:
            ours = table.add(case, provider, functools.partial(ours_fn, **kwargs))
            ours["vs_captum"] = captum_row["p50_ms"] / ours["p50_ms"]
    print("fidelity of bfloat16 against float32 maps")
    table.meta["fidelity"] = fidelity_rows(args.steps, args.fid_size, args.fid_batch)
    table.meta["loadavg_end"] = os.getloadavg()
    table.report(note="speedup = floor p50 / p50 (1.00x = the autograd floor); machine shared with other "
                      "jobs, timings noisy; fidelity rows in meta.fidelity")


if __name__ == "__main__":
    main()
