"""CAM family: the fused cam_combine op against its reference, and Grad-CAM end to end on
ResNet-50 layer4 and VGG16 features.29 at 224 against the model's forward pass alone, Captum
LayerGradCam (+ LayerAttribution.interpolate) and torchcam GradCAM, with one class and the
top-5 classes per image, called round-robin (median of ROUNDS calls each, so load on this
shared machine hits all alike; VGG16: 3 calls each);
pytorch-grad-cam cannot be imported here (it needs torchvision). Our Grad-CAM runs by default
(no argument) on CPU on a channels-last copy with its batch norms folded; it is also timed on
the model as given (``channels_last=False``) and with ``compute_dtype=torch.bfloat16``. Then
the fidelity of bfloat16 maps against float32 maps (per-map Spearman, top-10% pixel IoU) for CAM, Grad-CAM,
Grad-CAM++, LayerCAM and Score-CAM on the trained default model (shapes_cnn, 64 px) and on VGG16 /
ResNet-50 (random weights, 4 images at 112 px; Score-CAM there would take 512 / 2048 masked
forward passes per image, so it is measured on the default model only; VGG16 has no GAP head,
so no CAM).

    python benchmarks/bench_cam.py            # batch 8
    python benchmarks/bench_cam.py --batch32  # also batch 32 (a ResNet-50 forward is ~2 s here)
"""
import argparse
import os
import time

import numpy as np
import torch

from _runner import BenchTable
from cnnviz_fast import cam, cam_combine, grad_cam, grad_cam_pp, layer_cam, score_cam
from cnnviz_fast._precision import fidelity
from cnnviz_fast.data import shapes
from cnnviz_fast.models import resnet50, shapes_cnn, vgg16
from cnnviz_fast.reference import cam_combine_ref
from cnnviz_fast.reference.upsample import minmax_normalize_ref

OP_SHAPES = [(8, 2048, 7, 7), (32, 512, 14, 14), (64, 256, 28, 28)]
ROUNDS = 5  # end-to-end calls per provider, interleaved (a noisy shared machine)


def bench_op(table, device, fast):
    for shape in OP_SHAPES:
        acts, weights = torch.rand(shape, device=device), torch.randn(shape[:2], device=device)
        torch.testing.assert_close(cam_combine(acts, weights, 224, backend=fast),
                                   cam_combine_ref(acts, weights, (224, 224)), rtol=1e-4, atol=2e-5)
        case = f"cam_combine{shape}->224"
        for provider in ("reference", fast):
            row = table.add(case, provider, lambda: cam_combine(acts, weights, 224, backend=provider),
                            min_run_time=0.5)
            row["GB/s"] = (acts.numel() + shape[0] * 224 * 224) * 4 / row["p50_ms"] / 1e6


def bench_grad_cam(table, model, name, layer, batch, device, rounds=ROUNDS):
    from captum.attr import LayerAttribution, LayerGradCam
    from torchcam.methods import GradCAM

    x = torch.rand(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices
    top1 = top5[:, 0]
    captum = LayerGradCam(model, model.get_submodule(layer))

    def captum_cam(target):
        attr = captum.attribute(x, target=target, relu_attributions=True)
        return minmax_normalize_ref(LayerAttribution.interpolate(attr, (224, 224), "bilinear"))[:, 0]

    def torchcam_cam():
        with GradCAM(model, layer) as extractor:
            return extractor(top1.tolist(), model(x))[0]

    def forward():
        with torch.no_grad():
            return model(x)

    # equal to Captum on the model as given (the peers' rounding); the default path (channels-last,
    # folded batch norms) rounds differently, and on random-weight VGG16 a map can move at ReLU
    # kinks (seen: 0.017 of the [0, 1] range on one of 8 maps), so its distance is recorded
    ref = captum_cam(top1).detach()
    torch.testing.assert_close(grad_cam(model, x, top1, layer, channels_last=False), ref, rtol=1e-3, atol=1e-3)
    table.meta[f"{name} default path max |diff| to captum"] = float((grad_cam(model, x, top1, layer) - ref).abs().max())
    providers = [
        ("forward (no grad)", forward),
        ("cnnviz_fast grad_cam", lambda: grad_cam(model, x, top1, layer)),
        ("cnnviz_fast grad_cam top5", lambda: grad_cam(model, x, top5, layer)),
        ("cnnviz_fast grad_cam as given", lambda: grad_cam(model, x, top1, layer, channels_last=False)),
        ("cnnviz_fast grad_cam bfloat16", lambda: grad_cam(model, x, top1, layer, compute_dtype=torch.bfloat16)),
        ("captum LayerGradCam+interp", lambda: captum_cam(top1)),
        ("torchcam GradCAM (layer size)", torchcam_cam),
    ] + ([("captum LayerGradCam top5", lambda: [captum_cam(top5[:, j]) for j in range(5)])]
         if batch <= 8 else [])
    times = interleaved(providers, rounds)
    p50 = {name: float(np.median(t)) for name, t in times.items()}
    for provider, _ in providers:
        t = np.asarray(times[provider])
        row = dict(case=f"{name}.{layer} B={batch}", provider=provider, p50_ms=p50[provider],
                   p20_ms=float(np.percentile(t, 20)), p80_ms=float(np.percentile(t, 80)), runs=len(t))
        row["vs_baseline"] = p50["forward (no grad)"] / row["p50_ms"]
        row["x_forward"] = row["p50_ms"] / p50["forward (no grad)"]
        # speed-up over the peers (> 1: faster than them); the top-5 rows against their 5 calls
        top5 = provider.endswith("top5")
        captum = p50.get("captum LayerGradCam top5" if top5 else "captum LayerGradCam+interp")
        row["vs_captum"] = captum / row["p50_ms"] if captum else None
        row["vs_torchcam"] = None if top5 else p50["torchcam GradCAM (layer size)"] / row["p50_ms"]
        table.rows.append(row)
    return p50["cnnviz_fast grad_cam top5"] / p50["cnnviz_fast grad_cam"]


def fidelity_rows():
    """Spearman / top-10% IoU of bfloat16 against float32 maps, per method and model."""
    data = shapes(16, size=64, seed=7)
    torch.manual_seed(0)
    big = torch.rand(4, 3, 112, 112)
    runs = [("shapes_cnn (trained)", shapes_cnn().eval(), data.images, data.labels, "features.15",
             ("cam", "grad_cam", "grad_cam_pp", "layer_cam", "score_cam")),
            ("vgg16 (random)", vgg16().eval(), big, 3, "features.29", ("grad_cam", "grad_cam_pp", "layer_cam")),
            ("resnet50 (random)", resnet50().eval(), big, 3, "layer4",
             ("cam", "grad_cam", "grad_cam_pp", "layer_cam"))]
    # CAM finds its GAP layer itself
    methods = {"cam": lambda m, x, t, _layer, **k: cam(m, x, t, **k), "grad_cam": grad_cam,
               "grad_cam_pp": grad_cam_pp, "layer_cam": layer_cam, "score_cam": score_cam}
    rows = []
    for model_name, model, x, t, layer, names in runs:
        for name in names:
            ref = methods[name](model, x, t, layer)
            spearman, iou = fidelity(methods[name](model, x, t, layer, compute_dtype=torch.bfloat16), ref)
            rows.append(dict(model=model_name, method=name, spearman_mean=float(spearman.mean()),
                             spearman_min=float(spearman.min()), iou_top10_mean=float(iou.mean()), maps=len(iou)))
            print(f"  {model_name:<22} {name:<12} spearman mean {spearman.mean():.4f} min {spearman.min():.4f}  "
                  f"top-10% IoU {iou.mean():.3f}", flush=True)
    return rows


def interleaved(providers, rounds):
    """Milliseconds of each provider's calls, run round-robin (one warm-up round first) so that
    load from other users of this shared machine hits every provider alike."""
    times = {name: [] for name, _ in providers}
    for r in range(rounds + 1):
        for name, fn in providers:
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch32", action="store_true", help="also time batch 32 (slow on CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = "triton" if device == "cuda" else "cpp"
    table = BenchTable("cam", device, dtype="float32 (bfloat16 rows: compute_dtype)", loadavg_start=os.getloadavg())
    print("fidelity of bfloat16 against float32 maps")
    table.meta["fidelity"] = fidelity_rows()
    bench_op(table, device, fast)
    torch.manual_seed(0)
    model = resnet50().eval().to(device)
    notes = []
    for batch in (8, 32) if args.batch32 or device == "cuda" else (8,):
        notes.append(f"resnet50 B={batch}: top5/top1 "
                     f"{bench_grad_cam(table, model, 'resnet50', 'layer4', batch, device):.2f}x")
    torch.manual_seed(0)
    model = vgg16().eval().to(device)  # ~4x ResNet-50's work an image: fewer rounds
    notes.append(f"vgg16 B=8: top5/top1 {bench_grad_cam(table, model, 'vgg16', 'features.29', 8, device, 3):.2f}x")
    if device == "cpu":
        notes.append("random-weight ResNet-50 and VGG16; shared 2-core machine with other jobs, timings noisy")
    table.meta["loadavg_end"] = os.getloadavg()
    table.report("; ".join(notes + ["fidelity rows in meta.fidelity"]))

if __name__ == "__main__":
    main()
