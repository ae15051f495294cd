import torch

from .upsample import upsample_normalize_ref


def cam_combine_ref(activations: torch.Tensor, weights: torch.Tensor, size=None, relu: bool = True,
                    normalize: bool = True) -> torch.Tensor:
    """Weighted channel sum of ``activations [B, K, h, w]``, ReLU, bilinear resize to ``size``
    (``F.interpolate``, align_corners=False; None keeps h, w) and per-map min-max normalization.

    weights: channel weights ``[B, K]`` / ``[B, k, K]`` (map = sum_c w_c A_c) or elementwise
    weights ``[B, K, h, w]`` / ``[B, k, K, h, w]`` (map = sum_c w_c(y, x) A_c(y, x)).
    Returns ``[B, H, W]``, or ``[B, k, H, W]`` for weights with a k axis.
    """
    channel = weights.dim() in (2, 3)
    has_k = weights.dim() in (3, 5)
    w = weights if has_k else weights.unsqueeze(1)
    if channel:
        maps = torch.einsum("bjc,bchw->bjhw", w, activations)
    else:
        maps = (w * activations.unsqueeze(1)).sum(2)
    if relu:
        maps = torch.relu(maps)
    out = upsample_normalize_ref(maps, size, "bilinear", normalize)
    return out if has_k else out.squeeze(1)
