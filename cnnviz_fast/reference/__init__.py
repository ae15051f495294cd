"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .cam import cam_combine_ref
from .upsample import upsample_normalize_ref

__all__ = ["cam_combine_ref", "upsample_normalize_ref"]
