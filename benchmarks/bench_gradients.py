"""Gradient attributions on resnet50 (random weights) side by side in one run: the autograd
floor (the same forward passes plus one input-gradient backward, nothing else), Captum, and
cnnviz_fast. Ratios are against the floor; a method at 1.00x costs nothing beyond its gradients.

    PYTHONPATH=. python benchmarks/bench_gradients.py [--size 224] [--batch 8] [--steps 50]

Captum gets the same rows per pass as ours (``internal_batch_size`` / ``nt_samples_batch_size``)
so both hold the same memory; the floor runs the same chunks.
"""
import argparse
import warnings

import torch
from captum import attr as captum_attr

from _runner import BenchTable
from cnnviz_fast import deeplift, guided_backprop, integrated_gradients, saliency, smoothgrad
from cnnviz_fast.explain.gradients import _row_chunks
from cnnviz_fast.models import resnet50
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="batch of saliency, guided backprop, DeepLIFT")
    parser.add_argument("--steps", type=int, default=50, help="IG steps and SmoothGrad samples (1 image)")
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
                       rows_per_pass=chunk, dtype="float32")

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
         lambda: captum(captum_attr.Saliency, model, x, target=t), lambda: saliency(model, x, t)),
        (f"guided_backprop {batch}", lambda: floor(model, x, t, len(x)),
         lambda: captum(captum_attr.GuidedBackprop, model, x, target=t), lambda: guided_backprop(model, x, t)),
        (f"deeplift {batch}", lambda: floor(model, doubled, t, len(doubled)),
         lambda: captum(captum_attr.DeepLift, peer_model, x, target=t), lambda: deeplift(model, x, t)),
        (f"integrated_gradients {steps} steps", lambda: floor(model, path, t, chunk),
         lambda: captum(captum_attr.IntegratedGradients, model, one, target=t, n_steps=steps,
                        method="gausslegendre", internal_batch_size=chunk),
         lambda: integrated_gradients(model, one, t, steps=steps, method="gausslegendre")),
        (f"smoothgrad {steps} samples", lambda: floor(model, path, t, chunk),
         lambda: captum(captum_attr.NoiseTunnel, captum_attr.Saliency(model), one, nt_type="smoothgrad",
                        nt_samples=steps, nt_samples_batch_size=chunk, stdevs=0.15, target=t),
         lambda: smoothgrad(model, one, t, n_samples=steps)),
    ]
    for case, floor_fn, captum_fn, ours_fn in cases:
        table.add(case, "floor (autograd)", floor_fn)
        captum_row = table.add(case, "captum", captum_fn)
        ours = table.add(case, "cnnviz_fast", ours_fn)
        ours["vs_captum"] = captum_row["p50_ms"] / ours["p50_ms"]
    table.report(note="speedup = floor p50 / p50 (1.00x = the autograd floor); machine shared, timings noisy")


if __name__ == "__main__":
    main()
