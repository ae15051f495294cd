"""Backend selection: the one place that decides reference, C++ or Triton.

Order: the call's ``backend=``, then ``CNNVIZ_BACKEND``, then automatic (Triton for CUDA
tensors when importable, C++ for CPU float32 tensors when built, else the reference).
A backend asked for by name that cannot run raises; an automatic choice falls back quietly
(logged once at debug level). Nothing here imports triton or touches CUDA at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

BACKENDS = ("reference", "cpp", "triton")
_log = logging.getLogger("cnnviz_fast")


@functools.lru_cache(maxsize=None)
def _cpp_status():
    try:
        module = importlib.import_module("cnnviz_fast._C")
    except ImportError as err:
        return None, f"extension cnnviz_fast._C not built ({err}); run `pip install -e .`"
    return module, f"built, {module.openmp_threads} OpenMP threads"


def cpp_module():
    """The compiled extension ``cnnviz_fast._C``; raises if it is not built."""
    module, reason = _cpp_status()
    if module is None:
        raise RuntimeError(f"backend='cpp' is not available: {reason}")
    return module


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if _interpreting():
        return True, "importable, TRITON_INTERPRET=1 (kernels run on CPU tensors, slowly)"
    return True, "importable (runs on CUDA tensors)"


def backends() -> dict:
    """What can run here: ``{name: {"available": bool, "detail": str}}``.

    ``triton`` is available when the package is importable; it runs on CUDA tensors, or on
    CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported.
    """
    cpp, cpp_detail = _cpp_status()
    triton_ok, triton_detail = _triton_status()
    if triton_ok and not _interpreting() and not torch.cuda.is_available():
        triton_detail += "; no CUDA device here"
    return {
        "reference": {"available": True, "detail": "plain PyTorch, always available"},
        "cpp": {"available": cpp is not None, "detail": cpp_detail},
        "triton": {"available": triton_ok, "detail": triton_detail},
    }


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op, reason):
    _log.debug("%s: falling back to the reference (%s)", op, reason)


def choose(op: str, tensor: torch.Tensor, backend: str | None = None,
           cpp_dtypes=(torch.float32,)) -> str:
    """Pick the backend for ``op`` on ``tensor``: 'reference', 'cpp' or 'triton'."""
    requested = backend if backend is not None else os.environ.get("CNNVIZ_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            source = "backend" if backend is not None else "CNNVIZ_BACKEND (environment variable)"
            raise ValueError(f"{source}: expected one of {BACKENDS}{' or None' if backend is not None else ''}, "
                             f"got {requested!r}")
        _check_runnable(op, requested, tensor, cpp_dtypes)
        return requested
    if tensor.is_cuda:
        if _triton_status()[0]:
            return "triton"
        _log_fallback_once(op, _triton_status()[1])
        return "reference"
    if tensor.device.type == "cpu" and tensor.dtype in cpp_dtypes:
        if _cpp_status()[0] is not None:
            return "cpp"
        _log_fallback_once(op, _cpp_status()[1])
    return "reference"


def _check_runnable(op, name, tensor, cpp_dtypes):
    if name == "cpp":
        cpp_module()
        if tensor.device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' runs on CPU tensors, got a tensor on {tensor.device}")
        if tensor.dtype not in cpp_dtypes:
            raise ValueError(f"{op}: backend='cpp' takes {[str(d) for d in cpp_dtypes]}, got {tensor.dtype}")
    elif name == "triton":
        ok, detail = _triton_status()
        if not ok:
            raise RuntimeError(f"{op}: backend='triton' is not available: {detail}")
        if not tensor.is_cuda and not _interpreting():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                f"triton is imported), got a tensor on {tensor.device}")
