"""The ``cnnviz`` command line: ``cnnviz info``, ``cnnviz demo [--out DIR]``, ``cnnviz explain ...``
(a model over a dataset into a result store), ``cnnviz show DIR`` (that store's report again) and
``cnnviz bench`` (explainers scored by the metrics)."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch


def _version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as err:  # a missing or broken optional package is reported, not fatal
        return f"not available ({type(err).__name__})"


def info(_args) -> int:
    from . import __version__, backends
    print(f"cnnviz-fast {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  numpy {_version('numpy')}")
    for name in ("triton", "faiss", "openTSNE", "captum", "torchcam"):
        print(f"{name:<10} {_version(name)}")
    print(f"cpu: {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: none")
    print("backends:")
    for name, status in backends().items():
        print(f"  {name:<10} {'yes' if status['available'] else 'no ':<4} {status['detail']}")
    return 0


def demo(args) -> int:
    from .demo import run_demo
    path = run_demo(args.out, n_images=args.images, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def bench(args) -> int:
    from .bench import run_bench
    split = lambda v: None if v is None else [n.strip() for n in v.split(",") if n.strip()]  # noqa: E731
    try:
        paths = run_bench(args.out, args.model, args.data, args.images, args.size, args.layer,
                          split(args.explainers), split(args.metrics), progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:  # a usage error: exit 2, as explain's
        return _fail("bench", err, args.debug)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _fail(command: str, err: Exception, debug: bool) -> int:
    """One line on stderr (git's and ruff's way); the traceback only with --debug."""
    if debug:
        import traceback
        traceback.print_exception(err)
    print(f"cnnviz {command}: error: {err}", file=sys.stderr)
    return 2 if isinstance(err, (ValueError, FileNotFoundError, ImportError)) else 1


def explain(args) -> int:
    import shlex

    from .pipeline import ExplainError, explain_dataset
    from .store import StoreError
    try:
        results = explain_dataset(
            args.data, args.out, args.method, model=args.model, weights=args.weights, target=args.target,
            top_k=args.top_k, size=args.size, crop=args.crop, mean=args.mean, std=args.std, device=args.device,
            batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, overlays=args.overlays,
            metrics=[m for m in (args.metrics or "").split(",") if m], metric_steps=args.metric_steps,
            workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
            command=shlex.join(["cnnviz", "explain", *args.argv]), ray=args.ray, num_actors=args.num_actors,
            num_gpus_per_actor=args.gpus_per_actor)
    except (ExplainError, StoreError, ImportError) as err:
        return _fail("explain", err, args.debug)
    except Exception as err:  # the work itself failed: exit 1, still one line unless --debug
        return _fail("explain", RuntimeError(f"{type(err).__name__}: {err}"), args.debug)
    m = results.manifest
    print(f"explained {m['images'] - len(m['skipped'])} images ({len(m['skipped'])} skipped) with "
          f"{', '.join(results.methods)}: {len(results)} maps in {args.out}, report {args.out}/report.html")
    return 0


def show(args) -> int:
    from .report import results_report
    from .store import open_results
    try:
        results = open_results(args.dir)
        path = results_report(results).write(results.root / "report.html")
    except (FileNotFoundError, ValueError, ImportError) as err:
        return _fail("show", err, args.debug)
    print(f"wrote {path} ({len(results)} maps)")
    return 0


def _explain_parser(sub) -> None:
    p = sub.add_parser(
        "explain", help="explain every image of a dataset into a result store",
        description="Explain a dataset with a model into a result store (shards of maps, a Parquet index, "
                    "manifest.json, report.html). Re-running the same command resumes.",
        epilog="example: cnnviz explain --model cnnviz_fast.models:resnet50 --weights r50.safetensors "
               "--data photos/ --method grad_cam:layer=layer4 --method occlusion:window=16,stride=8 --out results/")
    p.add_argument("--model", help="package.module:function (with --weights), a TorchScript file or a .pt2 "
                                   "torch.export program (default: the embedded shapes model)")
    p.add_argument("--weights", help="state_dict for a factory --model (.pt, .pth or .safetensors)")
    p.add_argument("--data", required=True, help="image folder (class subfolders = labels), .csv/.txt list of "
                                                 "paths, or .pt/.npz tensor file")
    p.add_argument("--method", action="append", required=True, metavar="NAME[:key=value,...]",
                   help="an explainer and its parameters, e.g. grad_cam:layer=layer4 (repeatable)")
    p.add_argument("--out", required=True, help="result store folder")
    p.add_argument("--target", default="pred", help="pred (default), label, or a class index or name")
    p.add_argument("--top-k", type=int, default=1, help="with --target pred: the K best classes per image")
    p.add_argument("--size", type=int, help="resize the shorter side to this (default 256, default model 64)")
    p.add_argument("--crop", type=int, help="centre crop (default 224, default model 64)")
    p.add_argument("--mean", type=float, nargs="+", help="normalization mean (default ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", help="normalization std (default ImageNet's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, help="images per shard (a multiple of --batch-size; default 8 batches)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (default 2)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored maps")
    p.add_argument("--overlays", action="store_true", help="also write PNG overlays under DIR/overlays/")
    p.add_argument("--metrics", help="comma-separated: deletion,insertion (needs cnnviz_fast.metrics)")
    p.add_argument("--metric-steps", type=int, default=16, help="steps of the deletion/insertion curves")
    p.add_argument("--overwrite", action="store_true", help="replace a store of a different configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run the shards on a Ray cluster: auto (the cluster "
                                                         "`ray start` began here, else a local one) or its address")
    p.add_argument("--num-actors", type=int, default=1, help="with --ray: model replicas (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0, help="with --ray: GPUs per replica (default 0)")
    p.set_defaults(func=explain)
    s = sub.add_parser("show", help="write a result store's report.html again",
                       epilog="example: cnnviz show results/")
    s.add_argument("dir", help="result store folder")
    s.add_argument("--debug", action="store_true", help="tracebacks on errors")
    s.set_defaults(func=show)
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cnnviz", description="cnnviz-fast: CNN visualization and explanation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends").set_defaults(func=info)
    p = sub.add_parser("demo", help="run every method on the default model and write report.html")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--images", type=_positive_int, default=8, help="number of shapes images (default: 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="every explainer x every metric; JSON, CSV, Markdown and HTML",
                       description="Benchmark explainers with faithfulness, localisation, complexity and "
                                   "randomisation metrics. Example: cnnviz bench --images 16 --out bench_out")
    p.add_argument("--model", default="shapes_cnn",
                   help="shapes_cnn (embedded, default), a cnnviz_fast.models name (random weights) or module:factory")
    p.add_argument("--data", default=None, help="image folder (default: held-out shapes images with their masks)")
    p.add_argument("--images", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 64 for shapes_cnn, else 224)")
    p.add_argument("--layer", default=None, help="CAM layer (default: the embedded model's; else CAMs are left out)")
    p.add_argument("--explainers", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--metrics", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.set_defaults(func=bench)
    _explain_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
