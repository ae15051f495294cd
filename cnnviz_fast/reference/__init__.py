"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .upsample import upsample_normalize_ref
from .deeplift import deeplift_rescale_relu_grad_ref

__all__ = ["upsample_normalize_ref"]
__all__ += ["deeplift_rescale_relu_grad_ref"]
