"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .topk import channel_topk_ref, channel_topk_update_ref
from .upsample import upsample_normalize_ref

__all__ = ["upsample_normalize_ref", "channel_topk_ref", "channel_topk_update_ref"]
