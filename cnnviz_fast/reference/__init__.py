"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .cam import cam_combine_ref
from .deeplift import deeplift_rescale_relu_grad_ref
from .gram import gram_ref
from .incremental import incremental_gather_ref
from .occlusion import occlusion_copies_ref, occlusion_scatter_ref
from .perturb import perturb_by_rank_ref
from .topk import channel_topk_ref, channel_topk_update_ref
from .upsample import upsample_normalize_ref

__all__ = ["cam_combine_ref", "channel_topk_ref", "channel_topk_update_ref", "deeplift_rescale_relu_grad_ref",
           "gram_ref",
           "incremental_gather_ref", "occlusion_copies_ref", "occlusion_scatter_ref", "upsample_normalize_ref",
           "perturb_by_rank_ref"]
