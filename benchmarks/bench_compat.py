"""The drop-in interfaces against the packages they replace, on the same calls in one run:
``cnnviz_fast.compat.captum`` against Captum and ``cnnviz_fast.compat.pytorch_grad_cam``
against pytorch-grad-cam, on ResNet-50 (random weights), by default the issue's setting: batch 8
at 224 px. Ratios are the original's time over the adapter's (> 1: the adapter is faster).

    flock /tmp/cnnviz-bench.lock python3 benchmarks/bench_compat.py [--batch 8] [--size 224] [--repeats 2]

Rows that would run for many minutes on a shared 2-core CPU are reduced, and say so in their case
name and in ``reduction``: Integrated Gradients and NoiseTunnel with 4 path points / noisy copies
per image; Occlusion on 1 image with 32 px windows at stride 16 (169 windows; Captum's tutorial
windows, 15 px at stride 8, are 729 forward passes per image); LRP on VGG11 (Captum's LRP rejects
ResNet-50's batch norms and additions, as the adapter does) with 4 images; Score-CAM on 1 image at
64 px on layer1 (256 masked copies; layer4's 2,048 per image at 224 px would take many minutes).
Each pair is timed in alternation (``BenchTable.add_interleaved``: one warm-up call of each
side, whose outputs are compared (``max_rel_diff``: the largest difference over the original's
largest value), then ``--repeats`` rounds, the order reversed every
round); the long rows (``rounds 1`` in the JSON) one timed call each after the warm-up. The
machine is shared, so read the ratios, not the times.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _runner import BenchTable  # noqa: E402

from cnnviz_fast.compat import captum as ours  # noqa: E402
from cnnviz_fast.compat import pytorch_grad_cam as ours_cam  # noqa: E402
from cnnviz_fast.models import resnet50, vgg11  # noqa: E402
from tests._peers import import_pytorch_grad_cam  # noqa: E402
from tests.test_gradients import unique_relus  # noqa: E402


def close(a, b):
    """Max difference relative to the peer's scale (recorded with the row: the methods run on
    the engine's channels-last, batch-norm-folded copy, whose float32 rounding differs from
    the model's own; a ReLU gate flipped by it changes gradients below it)."""
    a, b = (t if isinstance(t, np.ndarray) else t.detach().numpy() for t in (a, b))
    return float(np.abs(a - b).max()) / (float(np.abs(b).max()) + 1e-30)


class _Kept:
    """``fn`` keeping its last output, so the warm-up calls of the timing are also the check."""

    def __init__(self, fn):
        self.fn, self.out = fn, None

    def __call__(self):
        self.out = self.fn()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of the short rows")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from captum import attr as captum
    gcam = import_pytorch_grad_cam()
    if gcam is None:
        raise SystemExit("pytorch-grad-cam (with opencv-python-headless and ttach) is needed for this benchmark")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(0)
    model = resnet50().eval()
    peer_model = unique_relus(model)  # Captum's DeepLift needs one ReLU module per call
    B, S = args.batch, args.size
    x = torch.rand(B, 3, S, S)
    target = 3
    loads = [os.getloadavg()]
    table = BenchTable("compat", "cpu", model="resnet50", size=S, batch=B, dtype="float32", loadavg=loads)

    def pair(case, peer_fn, ours_fn, repeats=args.repeats, reduction=None):
        peer, mine = _Kept(peer_fn), _Kept(ours_fn)
        extra = dict(rounds=repeats, **({"reduction": reduction} if reduction else {}))
        rows = table.add_interleaved(case, {"original": peer, "cnnviz compat": mine}, repeats=repeats, **extra)
        rows[1]["max_rel_diff"] = close(mine.out, peer.out)
        print(f"  {case}: max difference {rows[1]['max_rel_diff']:.1e} of the original's largest value", flush=True)

    # -- Captum
    for name in ("Saliency", "InputXGradient", "GuidedBackprop", "Deconvolution"):
        pair(f"captum {name}", lambda n=name: getattr(captum, n)(model).attribute(x, target=target),
             lambda n=name: getattr(ours, n)(model).attribute(x, target=target))
    pair("captum IntegratedGradients n4",
         lambda: captum.IntegratedGradients(model).attribute(x, target=target, n_steps=4, internal_batch_size=B),
         lambda: ours.IntegratedGradients(model).attribute(x, target=target, n_steps=4, internal_batch_size=B),
         repeats=1, reduction="n_steps=4")

    def noise_tunnel(lib):
        torch.manual_seed(1)
        return lib.NoiseTunnel(lib.Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1,
                                                              nt_samples_batch_size=1, target=target)
    pair("captum NoiseTunnel n4", lambda: noise_tunnel(captum), lambda: noise_tunnel(ours), repeats=1,
         reduction="nt_samples=4")
    pair("captum DeepLift", lambda: captum.DeepLift(peer_model).attribute(x, target=target),
         lambda: ours.DeepLift(model).attribute(x, target=target))
    occ_x = x[:1]
    occ = dict(sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), target=target)
    pair("captum Occlusion b1 w32 s16", lambda: captum.Occlusion(model).attribute(occ_x, **occ),
         lambda: ours.Occlusion(model).attribute(occ_x, **occ), repeats=1,
         reduction="1 image, window (3, 32, 32), stride (3, 16, 16): 169 windows")
    layer = model.layer4
    pair("captum LayerGradCam", lambda: captum.LayerGradCam(model, layer).attribute(x, target=target),
         lambda: ours.LayerGradCam(model, layer).attribute(x, target=target))
    pair("captum GuidedGradCam", lambda: captum.GuidedGradCam(model, layer).attribute(x, target=target),
         lambda: ours.GuidedGradCam(model, layer).attribute(x, target=target))
    pair("captum LayerActivation layer3", lambda: captum.LayerActivation(model, model.layer3).attribute(x),
         lambda: ours.LayerActivation(model, model.layer3).attribute(x))
    vgg = vgg11().eval()
    vx = x[:4]
    pair("captum LRP vgg11 b4", lambda: captum.LRP(vgg).attribute(vx, target=target),
         lambda: ours.LRP(vgg).attribute(vx, target=target),
         reduction="VGG11 (Captum's LRP rejects ResNet-50), 4 images")

    # -- pytorch-grad-cam
    layers = [model.layer4[-1]]
    gt, ot = [ClassifierOutputTarget(target)] * B, [ours_cam.ClassifierOutputTarget(target)] * B
    for name in ("GradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM"):
        pair(f"grad-cam {name}", lambda n=name: getattr(gcam, n)(model, layers)(x, targets=gt),
             lambda n=name: getattr(ours_cam, n)(model, layers)(x, targets=ot))
    pair("grad-cam GradCAM targets=None", lambda: gcam.GradCAM(model, layers)(x, targets=None),
         lambda: ours_cam.GradCAM(model, layers)(x))
    small = torch.rand(1, 3, 64, 64)
    pair("grad-cam ScoreCAM b1 64px layer1", lambda: gcam.ScoreCAM(model, [model.layer1[-1]])(small, targets=gt[:1]),
         lambda: ours_cam.ScoreCAM(model, [model.layer1[-1]])(small, targets=ot[:1]),
         reduction="1 image at 64 px, layer1[-1] (256 masked copies)")
    loads.append(os.getloadavg())
    table.report(note=f"loadavg {loads[0][0]:.1f} before, {loads[1][0]:.1f} after (other jobs shared the CPU)")


if __name__ == "__main__":
    main()
