"""The drop-in interfaces against the packages they replace, on the same calls in one run:
``cnnviz_fast.compat.captum`` against Captum and ``cnnviz_fast.compat.pytorch_grad_cam``
against pytorch-grad-cam, on ResNet-50 (random weights), by default batch 2 at 112 px unless a
row says otherwise (``--batch 8 --size 224``, the issue's setting, runs far past 3 minutes on
this project's shared 2-core CPU). Ratios are the original's time over the adapter's (> 1:
the adapter is faster).

    PYTHONPATH=. python benchmarks/bench_compat.py [--batch 2] [--size 112]

Rows that would run for minutes on a CPU are reduced, and say so in their case name:
Integrated Gradients and NoiseTunnel with 4 path points / noisy copies per image, Occlusion
with 32 px windows at stride 32 on 2 images (at most), LRP on VGG11 (Captum's LRP rejects ResNet-50's
batch norms and additions, as the adapter does) with 4 images (at most), Score-CAM on 1 image at 64 px
on layer1 (256 masked copies; layer4's 2,048 per image would take minutes). Each call runs
after a first correctness check (which also warms up), timed by ``blocked_autorange`` (median
of a few calls); the machine is shared, so read the ratios, not the times.
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


def close(a, b, rtol=1e-4):
    """Relative to the peer's scale: the same call must give the same numbers before timing."""
    a, b = (t if isinstance(t, np.ndarray) else t.detach().numpy() for t in (a, b))
    err = float(np.abs(a - b).max()) / (float(np.abs(b).max()) + 1e-30)
    if err > rtol:
        raise AssertionError(f"adapter and original differ: max relative difference {err:.2e}")
    return err


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=112)
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
    table = BenchTable("compat", "cpu", model="resnet50", size=S, batch=B, dtype="float32",
                       loadavg=os.getloadavg())

    def pair(case, peer_fn, ours_fn, rtol=1e-4):
        err = close(ours_fn(), peer_fn(), rtol)
        table.add(case, "original", peer_fn, min_run_time=0.1)
        table.add(case, "cnnviz compat", ours_fn, min_run_time=0.1, max_rel_diff=err)

    # -- Captum
    for name in ("Saliency", "InputXGradient", "GuidedBackprop", "Deconvolution"):
        pair(f"captum {name}", lambda n=name: getattr(captum, n)(model).attribute(x, target=target),
             lambda n=name: getattr(ours, n)(model).attribute(x, target=target))
    pair("captum IntegratedGradients n4",
         lambda: captum.IntegratedGradients(model).attribute(x, target=target, n_steps=4, internal_batch_size=B),
         lambda: ours.IntegratedGradients(model).attribute(x, target=target, n_steps=4, internal_batch_size=B))

    def noise_tunnel(lib):
        torch.manual_seed(1)
        return lib.NoiseTunnel(lib.Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1,
                                                              nt_samples_batch_size=1, target=target)
    pair("captum NoiseTunnel n4", lambda: noise_tunnel(captum), lambda: noise_tunnel(ours))
    pair("captum DeepLift", lambda: captum.DeepLift(peer_model).attribute(x, target=target),
         lambda: ours.DeepLift(model).attribute(x, target=target), rtol=1e-3)
    occ_x = x[:2]
    occ = dict(sliding_window_shapes=(3, 32, 32), strides=(3, 32, 32), target=target)
    pair("captum Occlusion b2 w32", lambda: captum.Occlusion(model).attribute(occ_x, **occ),
         lambda: ours.Occlusion(model).attribute(occ_x, **occ))
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
         lambda: ours.LRP(vgg).attribute(vx, target=target), rtol=1e-3)

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
         lambda: ours_cam.ScoreCAM(model, [model.layer1[-1]])(small, targets=ot[:1]))
    table.report(note=f"loadavg {os.getloadavg()[0]:.1f} (other jobs shared the CPU)")


if __name__ == "__main__":
    main()
