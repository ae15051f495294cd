"""cnnviz-fast: compiled-kernel engine for CNN visualization and explanation.

Importing the package never imports triton and never touches CUDA; Triton kernels load
lazily when a CUDA tensor (or ``TRITON_INTERPRET=1``) calls for them.
"""
from ._backend import backends
from ._hooks import resolve_layer
from .explain.lrp import lrp
from .ops import upsample_normalize

__version__ = "0.1.0"

__all__ = ["backends", "lrp", "resolve_layer", "upsample_normalize"]
