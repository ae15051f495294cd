"""cnnviz-fast: compiled-kernel engine for CNN visualization and explanation.

Importing the package never imports triton and never touches CUDA; Triton kernels load
lazily when a CUDA tensor (or ``TRITON_INTERPRET=1``) calls for them.
"""
from ._backend import backends
from ._hooks import resolve_layer
from .ops import upsample_normalize
from .explain.gradients import (deconvnet, deeplift, guided_backprop, integrated_gradients, saliency,
                                 smoothgrad, to_map)

__version__ = "0.1.0"

__all__ = ["backends", "resolve_layer", "upsample_normalize"]
__all__ += ["saliency", "to_map", "guided_backprop", "deconvnet", "smoothgrad", "integrated_gradients",
            "deeplift"]
