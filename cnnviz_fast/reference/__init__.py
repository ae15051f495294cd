"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .cam import cam_combine_ref
from .topk import channel_topk_ref, channel_topk_update_ref
from .upsample import upsample_normalize_ref
from .deeplift import deeplift_rescale_relu_grad_ref

__all__ = ["cam_combine_ref", "channel_topk_ref", "channel_topk_update_ref", "upsample_normalize_ref"]
__all__ += ["deeplift_rescale_relu_grad_ref"]
