"""Reference of the Gram matrix of feature maps (Gatys et al. 2015), normalized by C*H*W."""
import torch


def gram_ref(features: torch.Tensor) -> torch.Tensor:
    """``features [B, C, H, W]`` -> ``[B, C, C]``: ``G[b, i, j] = sum_p F[b, i, p] F[b, j, p] /
    (C * H * W)`` with ``p`` over the ``H * W`` positions. Differentiable by autograd."""
    B, C, H, W = features.shape
    flat = features.reshape(B, C, H * W)
    return flat @ flat.transpose(1, 2) / (C * H * W)
