"""The ``cnnviz`` command line: ``cnnviz info`` and ``cnnviz demo [--out DIR]``."""
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
