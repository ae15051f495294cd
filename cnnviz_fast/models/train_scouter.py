"""Train the shipped SCOUTER+ and SCOUTER- heads on the default model's backbone.

    python -m cnnviz_fast.models.train_scouter [--out-dir DIR] [--epochs N] [--sweep]

Training data: ``shapes(4000, size=64, seed=0)``; held-out: ``shapes(1000, size=64, seed=1)``
(the splits of ``train_shapes``). The backbone is ``shapes_cnn()``'s convolutional body with
its shipped weights, frozen: its features are computed once and only the heads train
(``train_scouter``: cross-entropy + area loss, AdamW, cosine schedule, seed 0, 1 thread).
It prints SCOUTER-'s confusable-pair scores (``confusable_pairs``). ``--sweep`` also trains
SCOUTER+ at each ``--sweep-lambdas`` value and prints (and writes as JSON to ``--sweep-json``,
with the scores) the area / accuracy table of README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from .._atomic import atomic_write
from ..data import SHAPE_CLASSES, shapes
from ..explain.scouter import ScouterModel, scouter_explain, scouter_model, train_scouter
from ._shapes_cnn import shapes_cnn
from ._shapes_scouter import SHAPES_SCOUTER_HEAD, shapes_scouter_head, shapes_scouter_weights
from .train_shapes import HELD_OUT_SEED, IMAGE_SIZE, TRAIN_SEED


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cnnviz_fast.models.train_scouter",
                                     description=__doc__.split("\n")[1])
    parser.add_argument("--out-dir", type=Path, default=shapes_scouter_weights(True).parent,
                        help="folder for shapes_scouter_{positive,negative}.pt (default: the shipped ones)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--n-train", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--n-held-out", type=int, default=1000, help="held-out images (default 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    parser.add_argument("--lambda-area", type=float, default=SHAPES_SCOUTER_HEAD["lambda_area"],
                        help="area-loss weight of the shipped heads")
    parser.add_argument("--sweep", action="store_true", help="also train SCOUTER+ at each --sweep-lambdas value")
    parser.add_argument("--sweep-lambdas", default="0.1,1,10", help="comma-separated lambda_area values")
    parser.add_argument("--sweep-json", type=Path, default=Path("benchmarks/results/scouter-lambda.json"))
    args = parser.parse_args(argv)
    for name in ("epochs", "n_train", "n_held_out", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.sweep_lambdas = [float(v) for v in args.sweep_lambdas.split(",")]
    except ValueError:
        parser.error(f"--sweep-lambdas: expected comma-separated numbers, got {args.sweep_lambdas!r}")
    return args


@torch.no_grad()
def evaluate(model: ScouterModel, data, batch_size: int = 500) -> dict:
    """Held-out checks of a shapes SCOUTER model (eval mode) on ``data`` (``shapes(...)``).

    accuracy: top-1. area: mean over images of the true class's attention map averaged over
    its positions (the share of the feature map it covers, 0..1). pointing: share of images
    whose true-class map (``scouter_explain``, input size) peaks inside the shape's mask.
    least_attention: share of images where the true class's total attention is below every
    other class's. true_total / other_total: mean total attention of the true class / of the
    other classes.
    """
    model.eval()
    rows = {"correct": [], "area": [], "inside": [], "least": [], "true_total": [], "other_total": []}
    for i in range(0, len(data.images), batch_size):
        images, labels, masks = (t[i:i + batch_size] for t in (data.images, data.labels, data.masks))
        logits, attention = model.attend(images)
        totals = model.head.class_attention(attention).sum((2, 3))  # [B, classes]
        true = totals.gather(1, labels[:, None])[:, 0]
        others = totals.scatter(1, labels[:, None], float("inf"))
        peak = scouter_explain(model, images, labels).flatten(1).argmax(1)
        rows["correct"].append(logits.argmax(1) == labels)
        rows["area"].append(true / attention[0, 0].numel())
        rows["inside"].append(masks.flatten(1).gather(1, peak[:, None])[:, 0])
        rows["least"].append(true < others.min(1).values)
        rows["true_total"].append(true)
        rows["other_total"].append((totals.sum(1) - true) / (totals.shape[1] - 1))
    means = {k: torch.cat(v).float().mean().item() for k, v in rows.items()}
    return {"accuracy": means["correct"], "area": means["area"], "pointing": means["inside"],
            "least_attention": means["least"], "true_total": means["true_total"],
            "other_total": means["other_total"]}


# Confusable pairs, both ways: images of the key class, SCOUTER- map of the value class.
CONFUSABLE = {"ring": "circle", "circle": "ring", "star": "cross", "cross": "star"}


@torch.no_grad()
def confusable_pairs(model: ScouterModel, n: int = 1000, seed: int = HELD_OUT_SEED) -> dict:
    """Whether the map of a confusable class lights the feature that tells it from the true one.

    For each pair ``A -> B`` of ``CONFUSABLE``, on the images of class A among
    ``shapes(n, seed=seed)``: the telling region is where A's and B's drawings differ at the
    same centre, size and rotation (A's mask XOR B's; B is rendered by reordering the class
    names, which keeps every draw), e.g. the ring's hole for ring vs circle. The map is B's
    (``scouter_explain``, input size, min-max normalised as drawn). Returns per pair: images;
    in_region, the mean share of the map's mass inside the region; enrichment, that share over
    the region's share of the image (chance 1; a map spread evenly over A's own mask scores
    about 10 for a circle, 5 for a star: this only says the map is on the shapes);
    enriched_2x, the share of images with enrichment >= 2; footprint_enrichment, the region's
    share of the map's mass on the two shapes' union over its share of the union's area
    (1: the union lit evenly; above 1: the telling part preferred); peak_in_region, the share
    of images whose map peaks inside the region.
    """
    model.eval()
    data = shapes(n, size=IMAGE_SIZE, seed=seed)
    counterpart = shapes(n, size=IMAGE_SIZE, seed=seed, classes=tuple(CONFUSABLE.get(c, c) for c in SHAPE_CLASSES))
    results = {}
    for true, wrong in CONFUSABLE.items():
        sel = data.labels == SHAPE_CLASSES.index(true)
        region = (data.masks[sel] ^ counterpart.masks[sel]).flatten(1).float()
        union = (data.masks[sel] | counterpart.masks[sel]).flatten(1).float()
        maps = scouter_explain(model, data.images[sel], SHAPE_CLASSES.index(wrong)).flatten(1)
        in_region = (maps * region).sum(1)
        share = in_region / maps.sum(1).clamp_min(1e-12)
        enrichment = share / region.mean(1)
        footprint = in_region / (maps * union).sum(1).clamp_min(1e-12) / (region.sum(1) / union.sum(1))
        peak = region.gather(1, maps.argmax(1, keepdim=True))[:, 0]
        results[f"{true}->{wrong}"] = {
            "images": int(sel.sum()), "in_region": share.mean().item(), "enrichment": enrichment.mean().item(),
            "enriched_2x": (enrichment >= 2).float().mean().item(),
            "footprint_enrichment": footprint.mean().item(), "peak_in_region": peak.mean().item()}
    return results


def _train(positive: bool, lambda_area: float, train, args) -> ScouterModel:
    torch.manual_seed(TRAIN_SEED)  # the head's initialisation
    model = scouter_model(shapes_cnn().features, shapes_scouter_head(positive, lambda_area=lambda_area))
    train_scouter(model, train, epochs=args.epochs, seed=TRAIN_SEED, batch_size=args.batch_size, lr=args.lr)
    return model.eval()


def _save_head(model: ScouterModel, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save({k: v.contiguous() for k, v in model.head.state_dict().items()}, f)


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


def _line(name: str, metrics: dict) -> str:
    return name + "  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate on the held-out images, write the heads; returns the metrics by variant."""
    args = parse_args(argv)
    # One thread: the head's small ops gain little from two, and on a shared CPU two threads
    # spin against other jobs (6x slower per step here at load 5).
    torch.set_num_threads(1)
    start = time.perf_counter()
    train = shapes(args.n_train, size=IMAGE_SIZE, seed=TRAIN_SEED)
    held_out = shapes(args.n_held_out, size=IMAGE_SIZE, seed=HELD_OUT_SEED)
    results = {}
    for positive in (True, False):
        name = "SCOUTER+" if positive else "SCOUTER-"
        model = _train(positive, args.lambda_area, train, args)
        results[name] = evaluate(model, held_out)
        _save_head(model, args.out_dir / shapes_scouter_weights(positive).name)
        print(_line(name, results[name]), f"  {time.perf_counter() - start:.0f}s", flush=True)
        if not positive:
            results["SCOUTER- confusable"] = confusable_pairs(model, args.n_held_out)
            for pair, metrics in results["SCOUTER- confusable"].items():
                print(_line(f"  {pair}", metrics), flush=True)
    if args.sweep:
        sweep = []
        for lam in args.sweep_lambdas:
            metrics = (results["SCOUTER+"] if lam == args.lambda_area
                       else evaluate(_train(True, lam, train, args), held_out))
            sweep.append({"lambda_area": lam, **metrics})
            print(_line(f"SCOUTER+ lambda_area={lam:g}", metrics), flush=True)
        results["sweep"] = sweep
        record = {"command": "python -m cnnviz_fast.models.train_scouter --sweep",
                  "args": {k: str(v) for k, v in vars(args).items()},
                  "held_out": f"shapes({args.n_held_out}, seed={HELD_OUT_SEED})", "torch": torch.__version__,
                  "commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "loadavg": os.getloadavg(), "seconds": round(time.perf_counter() - start), **results}
        with atomic_write(args.sweep_json, "w") as f:
            json.dump(record, f, indent=1)
    print(f"training time: {time.perf_counter() - start:.0f}s; wrote heads to {args.out_dir}")
    return results


if __name__ == "__main__":
    main()
