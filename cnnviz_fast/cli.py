"""The ``cnnviz`` command line: ``cnnviz info``, ``cnnviz demo [--out DIR]`` and ``cnnviz bench``."""
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
    except (ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"cnnviz bench: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cnnviz", description="cnnviz-fast: CNN visualization and explanation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends").set_defaults(func=info)
    p = sub.add_parser("demo", help="run every method on the default model and write report.html")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--images", type=int, default=8, help="number of shapes images (default: 8)")
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
