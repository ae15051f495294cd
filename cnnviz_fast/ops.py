"""The dispatch point of every fast operation: reference, C++ or Triton by device.

Each function here validates its arguments, asks ``_backend.choose`` which implementation
runs, and calls it. The references live in ``cnnviz_fast.reference`` and are always
reachable by name (``backend="reference"``).
"""
from __future__ import annotations

import torch

from . import _backend
from ._checks import check_map_size, check_same_device, check_tensor, pair
from .reference import (cam_combine_ref, channel_topk_update_ref, deeplift_rescale_relu_grad_ref, gram_ref,
                        incremental_gather_ref, occlusion_copies_ref, occlusion_scatter_ref,
                        perturb_by_rank_ref, upsample_normalize_ref)
from .reference.topk import nan_error

_MODES = ("bilinear", "nearest")


def upsample_normalize(maps: torch.Tensor, size=None, mode: str = "bilinear",
                       normalize: bool = True, backend: str | None = None) -> torch.Tensor:
    """Resize heatmaps and min-max normalize each one, in one pass.

    maps: float tensor ``[B, k, h, w]`` on any device. size: ``(H, W)``, an int, or None
    (keep ``h, w``). mode: ``"bilinear"`` (equals ``F.interpolate(mode="bilinear",
    align_corners=False)``, as pytorch-grad-cam and Captum's ``LayerAttribution.interpolate``
    resize) or ``"nearest"`` (``F.interpolate(mode="nearest")``). normalize: scale each map to
    [0, 1] by its min and max; a constant map gives zeros, never NaN.
    Returns ``[B, k, H, W]`` of the input's dtype on the input's device.
    """
    check_tensor("maps", maps, ndim=4)
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    check_map_size("maps", maps)
    out_size = tuple(maps.shape[-2:]) if size is None else pair("size", size)
    impl = _backend.choose("upsample_normalize", maps, backend)
    if maps.shape[0] * maps.shape[1] == 0:  # no map: nothing may reach a kernel
        return maps.new_empty((*maps.shape[:2], *out_size))
    if impl == "reference":
        return upsample_normalize_ref(maps, out_size, mode, normalize)
    B, k, h, w = maps.shape
    src = maps.contiguous().view(B * k, h, w)
    out = torch.empty((B * k, *out_size), dtype=maps.dtype, device=maps.device)
    if impl == "cpp":
        _backend.cpp_module().upsample_normalize_cpu(src.detach().numpy(), out.numpy(), mode == "bilinear", normalize)
    else:
        from .kernels.upsample import upsample_normalize_triton
        upsample_normalize_triton(src, out, mode == "bilinear", normalize)
    return out.view(B, k, *out_size)


def cam_combine(activations: torch.Tensor, weights: torch.Tensor, size=None, relu: bool = True,
                normalize: bool = True, backend: str | None = None) -> torch.Tensor:
    """The combining step of every CAM method, fused: weighted channel sum, ReLU, bilinear
    resize and per-map min-max normalization in one pass over the activations.

    activations: float ``[B, K, h, w]`` (a layer's output). weights, on the same device:
    channel weights ``[B, K]`` or ``[B, k, K]`` (k maps per sample; map = sum_c w_c A_c: CAM's
    fc rows, Grad-CAM's spatial mean of the gradients, Grad-CAM++'s alpha-weighted sums,
    Score-CAM's scores) or elementwise weights ``[B, K, h, w]`` / ``[B, k, K, h, w]``
    (map = sum_c w_c(y, x) A_c(y, x): LayerCAM's relu(gradients)); cast to the activations'
    dtype. size: ``(H, W)``, an int, or None (keep ``h, w``); the resize equals
    ``F.interpolate(mode="bilinear", align_corners=False)``. relu: clamp the sum at 0 before
    resizing. normalize: scale each map to [0, 1] (a constant map gives zeros).
    Returns ``[B, H, W]`` (weights without a k axis) or ``[B, k, H, W]``, of the activations'
    dtype, on their device.
    """
    check_tensor("activations", activations, ndim=4)
    check_tensor("weights", weights, ndim=(2, 3, 4, 5))
    check_same_device(activations=activations, weights=weights)
    B, K, h, w = activations.shape
    channel = weights.dim() in (2, 3)
    has_k = weights.dim() in (3, 5)
    want = (B, K) if channel else (B, K, h, w)
    got = tuple(weights.shape[:1] + weights.shape[2:]) if has_k else tuple(weights.shape)
    if got != want:
        form = "[B, K] or [B, k, K]" if channel else "[B, K, h, w] or [B, k, K, h, w]"
        raise ValueError(f"weights: expected {form} with B, K, h, w = {B}, {K}, {h}, {w} from "
                         f"activations, got shape {tuple(weights.shape)}")
    check_map_size("activations", activations)
    if K == 0:
        raise ValueError(f"activations: has no channels (shape {tuple(activations.shape)})")
    out_size = (h, w) if size is None else pair("size", size)
    weights = weights.to(activations.dtype)
    impl = _backend.choose("cam_combine", activations, backend)
    if B == 0 or (has_k and weights.shape[1] == 0):  # no map: nothing may reach a kernel
        return activations.new_empty((B, *weights.shape[1:2 if has_k else 1], *out_size))
    if impl == "reference":
        return cam_combine_ref(activations, weights, out_size, relu, normalize)
    acts = activations.detach().contiguous()
    wts = (weights if has_k else weights.unsqueeze(1)).detach().contiguous()
    out = torch.empty((B, wts.shape[1], *out_size), dtype=activations.dtype, device=activations.device)
    if impl == "cpp":
        _backend.cpp_module().cam_combine_cpu(acts.numpy(), wts.numpy(), out.numpy(), relu, normalize)
    else:
        from .kernels.cam import cam_combine_triton
        cam_combine_triton(acts, wts, out, relu, normalize)
    return out if has_k else out.squeeze(1)
def channel_topk_update(activations: torch.Tensor, ids: torch.Tensor, running_values: torch.Tensor,
                        running_ids: torch.Tensor, running_pos: torch.Tensor,
                        backend: str | None = None):
    """Merge one batch of feature maps into running per-channel top-k lists, in one pass.

    activations: float ``[B, C, h, w]``; ids: int64 ``[B]``, >= 0 (image ids); running lists
    ``[C, k]``: values (the activations' dtype), ids and flat positions ``y * w + x`` (int64),
    all on one device. Each (image, channel) map gives one candidate, its spatial maximum at
    its first position in row-major order; each channel keeps the k best by value descending,
    then id ascending, then position ascending (so results do not depend on batching); empty
    slots are ``(-inf, -1, -1)``. A NaN activation raises ``ValueError`` naming the channel.
    Returns new ``(values, ids, pos)`` ``[C, k]``; the inputs are not modified. Equals
    ``channel_topk_update_ref`` (store all candidates, then an explicit lexsort) exactly.
    """
    check_tensor("activations", activations, ndim=4)
    check_tensor("ids", ids, ndim=1, floating=False)
    check_tensor("running_values", running_values, ndim=2)
    check_tensor("running_ids", running_ids, ndim=2, floating=False)
    check_tensor("running_pos", running_pos, ndim=2, floating=False)
    check_same_device(activations=activations, ids=ids, running_values=running_values,
                      running_ids=running_ids, running_pos=running_pos)
    B, C, h, w = activations.shape
    if ids.dtype != torch.int64 or ids.shape[0] != B:
        raise ValueError(f"ids: expected int64 [{B}] (one id per image), got {ids.dtype} {list(ids.shape)}")
    if B and int(ids.min()) < 0:
        raise ValueError("ids: expected ids >= 0 (-1 marks an empty slot)")
    if running_values.shape[0] != C or running_values.shape[1] < 1:
        raise ValueError(f"running_values: expected [{C}, k] with k >= 1, got {list(running_values.shape)}")
    if running_values.dtype != activations.dtype:
        raise TypeError(f"running_values: dtype {running_values.dtype} differs from activations {activations.dtype}")
    for name, t in (("running_ids", running_ids), ("running_pos", running_pos)):
        if t.shape != running_values.shape or t.dtype != torch.int64:
            raise ValueError(f"{name}: expected int64 {list(running_values.shape)}, got {t.dtype} {list(t.shape)}")
    impl = _backend.choose("channel_topk_update", activations, backend)
    if impl == "reference":
        return channel_topk_update_ref(activations, ids, running_values, running_ids, running_pos)
    acts = activations.detach().contiguous().view(B, C, h * w)
    lists = [t.contiguous() for t in (running_values, running_ids, running_pos)]
    outs = [torch.empty_like(t) for t in lists]
    if impl == "cpp":
        nan_channel = _backend.cpp_module().channel_topk_update_cpu(
            acts.numpy(), ids.contiguous().numpy(), *(t.numpy() for t in lists), *(t.numpy() for t in outs))
    else:
        from .kernels.topk import channel_topk_update_triton
        nan = channel_topk_update_triton(acts, ids.contiguous(), *lists, *outs).nonzero()
        nan_channel = int(nan[0]) if len(nan) else -1
    if nan_channel >= 0:
        raise nan_error(nan_channel)
    return tuple(outs)


def _check_windows(image_index, positions, window, num_images, H, W):
    check_tensor("image_index", image_index, ndim=1, floating=False)
    check_tensor("positions", positions, ndim=2, floating=False)
    if positions.shape != (image_index.shape[0], 2):
        raise ValueError(f"positions: expected shape ({image_index.shape[0]}, 2) = (top, left) per "
                         f"window, got {tuple(positions.shape)}")
    if image_index.numel() and (image_index.min() < 0 or image_index.max() >= num_images):
        raise ValueError(f"image_index: values must lie in [0, {num_images})")
    if positions.numel() and (positions.min() < 0 or positions[:, 0].max() >= H or positions[:, 1].max() >= W):
        raise ValueError(f"positions: window corners must lie inside the {H}x{W} image")
    return pair("window", window), image_index.long().contiguous(), positions.long().contiguous()


def occlusion_copies(images: torch.Tensor, baselines: torch.Tensor, image_index: torch.Tensor,
                     positions: torch.Tensor, window, out: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Occluded copies for a list of windows, written straight into one batch buffer.

    images, baselines: ``[N, C, H, W]`` of one float dtype on one device. image_index:
    ``[P]`` ints (which image each copy is of); positions: ``[P, 2]`` ints, the (top, left)
    of each window; window: ``(h, w)`` or an int. Windows that run past the border are
    clipped, as Captum's ``Occlusion`` clips them. out: optional ``[P, C, H, W]`` buffer.
    Returns ``out``: copy p is ``images[image_index[p]]`` with its window replaced by
    ``baselines[image_index[p]]``.
    """
    check_tensor("images", images, ndim=4)
    check_tensor("baselines", baselines, ndim=4)
    if baselines.shape != images.shape or baselines.dtype != images.dtype:
        raise ValueError(f"baselines: expected {images.dtype} of shape {tuple(images.shape)}, got "
                         f"{baselines.dtype} of shape {tuple(baselines.shape)}")
    check_same_device(images=images, baselines=baselines, image_index=image_index, positions=positions)
    N, C, H, W = images.shape
    window, image_index, positions = _check_windows(image_index, positions, window, N, H, W)
    shape = (image_index.shape[0], C, H, W)
    if out is None:
        out = torch.empty(shape, dtype=images.dtype, device=images.device)
    elif out.shape != shape or out.dtype != images.dtype or out.device != images.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {images.dtype} tensor of shape {shape} on {images.device}")
    impl = _backend.choose("occlusion_copies", images, backend)
    if out.numel() == 0:  # no window or no pixel: nothing may reach a kernel
        return out
    if impl == "reference":
        out.copy_(occlusion_copies_ref(images, baselines, image_index, positions, window))
        return out
    images, baselines = images.detach().contiguous(), baselines.detach().contiguous()
    if impl == "cpp":
        _backend.cpp_module().occlusion_copies_cpu(images.numpy(), baselines.numpy(), image_index.numpy(),
                                                   positions.numpy(), window[0], window[1], out.numpy())
    else:
        from .kernels.occlusion import occlusion_copies_triton
        occlusion_copies_triton(images, baselines, image_index, positions, window, out)
    return out


def occlusion_scatter(drops: torch.Tensor, image_index: torch.Tensor, positions: torch.Tensor, window,
                      sums: torch.Tensor, counts: torch.Tensor, backend: str | None = None):
    """Scatter score drops over their windows, with counts, into the occlusion map.

    drops: ``[P]`` or ``[P, k]`` floats; image_index ``[P]`` and positions ``[P, 2]`` (top,
    left) as for ``occlusion_copies``. sums ``[N, k, H, W]`` and counts ``[N, H, W]`` of one
    float dtype are accumulated in place (drop ``j`` of window p over its clipped pixels, and
    1 per window); ``sums / counts[:, None]`` is then Captum's averaged occlusion map.
    Returns ``(sums, counts)``.
    """
    check_tensor("drops", drops, ndim=(1, 2))
    check_tensor("sums", sums, ndim=4)
    check_tensor("counts", counts, ndim=3)
    drops = drops[:, None] if drops.dim() == 1 else drops
    N, k, H, W = sums.shape
    if drops.shape[1] != k:
        raise ValueError(f"drops: expected {k} values per window to match sums, got {drops.shape[1]}")
    if counts.shape != (N, H, W) or counts.dtype != sums.dtype:
        raise ValueError(f"counts: expected {sums.dtype} of shape {(N, H, W)}, got {counts.dtype} "
                         f"of shape {tuple(counts.shape)}")
    if not (sums.is_contiguous() and counts.is_contiguous()):
        raise ValueError("sums, counts: expected contiguous tensors (they are accumulated in place)")
    check_same_device(drops=drops, image_index=image_index, positions=positions, sums=sums, counts=counts)
    window, image_index, positions = _check_windows(image_index, positions, window, N, H, W)
    impl = _backend.choose("occlusion_scatter", sums, backend)
    if drops.shape[0] == 0 or sums.numel() == 0:  # nothing to scatter: nothing may reach a kernel
        return sums, counts
    drops = drops.detach().to(sums.dtype).contiguous()
    if impl == "reference":
        new_sums, new_counts = occlusion_scatter_ref(drops, image_index, positions, window, sums, counts)
        sums.copy_(new_sums)
        counts.copy_(new_counts)
    elif impl == "cpp":
        _backend.cpp_module().occlusion_scatter_cpu(drops.numpy(), image_index.numpy(), positions.numpy(),
                                                    window[0], window[1], sums.numpy(), counts.numpy())
    else:
        from .kernels.occlusion import occlusion_scatter_triton
        occlusion_scatter_triton(drops, image_index, positions, window, sums, counts)
    return sums, counts


# The gather only copies elements: its C++ kernel takes float32 and the 16-bit floats.
_GATHER_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def incremental_gather(clean: torch.Tensor, region: torch.Tensor, region_offsets: torch.Tensor,
                       target_offsets: torch.Tensor, size, fill: float = 0.0,
                       backend: str | None = None) -> torch.Tensor:
    """Per-patch windows of a clean activation overlaid with updated regions, in one pass.

    The gather/overlay step of incremental inference (Krypton, Nakandala et al. SIGMOD 2019):
    clean ``[C, H, W]`` is the activation of the unoccluded image, shared by all patches;
    region ``[P, C, rh, rw]`` holds each patch's recomputed values, its top-left corner at
    ``region_offsets[p]`` (``[P, 2]`` int64 (top, left)); the window of ``size = (th, tw)``
    starts at ``target_offsets[p]`` and may extend past the map (a layer's halo). Returns
    ``[P, C, th, tw]`` of clean's dtype on clean's device: region values where the window
    meets the region, clean values elsewhere in the map, ``fill`` outside it (0.0 for zero
    padding, ``-inf`` for max pooling). ``rh`` or ``rw`` may be 0 (a plain windowed gather).
    dtypes: float32, bfloat16 or float16 (all three in C++). The C++ backend keeps a
    channels-last ``clean`` (channel stride 1) channels-last in its output (strides of
    ``torch.channels_last``); the values never depend on the layout.
    """
    check_tensor("clean", clean, ndim=3)
    check_tensor("region", region, ndim=4)
    for name, off in (("region_offsets", region_offsets), ("target_offsets", target_offsets)):
        check_tensor(name, off, ndim=2, floating=False)
        if off.dtype != torch.int64 or off.shape != (region.shape[0], 2):
            raise ValueError(f"{name}: expected an int64 tensor of shape [{region.shape[0]}, 2], "
                             f"got {off.dtype} {tuple(off.shape)}")
    check_same_device(clean=clean, region=region, region_offsets=region_offsets, target_offsets=target_offsets)
    if region.shape[1] != clean.shape[0] or region.dtype != clean.dtype:
        raise ValueError(f"region: expected [P, {clean.shape[0]}, rh, rw] of {clean.dtype}, "
                         f"got {tuple(region.shape)} of {region.dtype}")
    th, tw = pair("size", size)
    impl = _backend.choose("incremental_gather", clean, backend, cpp_dtypes=_GATHER_CPP_DTYPES)
    if impl == "reference":
        return incremental_gather_ref(clean, region, region_offsets, target_offsets, (th, tw), fill)
    P, C = region.shape[:2]
    if impl == "cpp":
        # Channels-last maps stay channels-last (1 plane of C-element pixels), so that a
        # network run in that layout never converts.
        last = C > 1 and clean.permute(1, 2, 0).is_contiguous()
        planes, unit = (1, C) if last else (C, 1)
        src = clean.detach().permute(1, 2, 0) if last else clean.detach().contiguous()
        reg = region.detach().permute(0, 2, 3, 1).contiguous() if last else region.detach().contiguous()
        out = torch.empty((P, th, tw, C) if last else (P, C, th, tw), dtype=clean.dtype)
        arrays = [t.reshape(shape) for t, shape in ((src, (planes, *clean.shape[1:], unit)),
                                                   (reg, (P, planes, *region.shape[2:], unit)),
                                                   (out, (P, planes, th, tw, unit)))]
        offsets = region_offsets.contiguous().numpy(), target_offsets.contiguous().numpy()
        if clean.dtype == torch.float32:
            _backend.cpp_module().incremental_gather_cpu(
                arrays[0].numpy(), arrays[1].numpy(), *offsets, arrays[2].numpy(), float(fill))
        else:  # a 16-bit float: the kernel copies bit patterns
            bits = torch.tensor(fill, dtype=clean.dtype).view(torch.int16).item()
            _backend.cpp_module().incremental_gather_cpu16(
                *(a.view(torch.int16).numpy() for a in arrays[:2]), *offsets, arrays[2].view(torch.int16).numpy(),
                bits)
        return out.permute(0, 3, 1, 2) if last else out
    out = torch.empty((P, C, th, tw), dtype=clean.dtype, device=clean.device)
    if impl == "triton":
        from .kernels.incremental import incremental_gather_triton
        incremental_gather_triton(clean.contiguous(), region.contiguous(), region_offsets.contiguous(),
                                  target_offsets.contiguous(), out, float(fill))
    return out


def deeplift_rescale_relu_grad(grad: torch.Tensor, x: torch.Tensor, eps: float = 1e-10,
                               backend: str | None = None) -> torch.Tensor:
    """The backward of the DeepLIFT rescale rule on ReLU in one pass (Captum ``DeepLift``'s
    ``nonlinear``): ``grad * factor`` with the multiplier computed on the fly from ``x``.

    x: the ReLU's float input ``[2N, ...]`` holding ``[inputs; references]`` (even first
    dimension); grad: the output gradient, same shape. ``factor`` is ``(relu(x_in) -
    relu(x_ref)) / (x_in - x_ref)`` on both halves, or each half's ``x > 0`` where
    ``|x_in - x_ref| < eps``. Returns ``[2N, ...]``, same dtype and device as ``x``.
    """
    check_tensor("x", x)
    check_tensor("grad", grad)
    check_same_device(grad=grad, x=x)
    if x.dim() < 1 or x.shape[0] % 2:
        raise ValueError(f"x: expected [inputs; references] with an even first dimension, got shape {tuple(x.shape)}")
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad: expected x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(grad.shape)} {grad.dtype}")
    impl = _backend.choose("deeplift_rescale_relu_grad", x, backend)
    if impl == "reference":
        return deeplift_rescale_relu_grad_ref(grad, x, eps)
    # elementwise, and the halves are batch-major in either layout: channels-last stays so (a
    # channels-first copy would make the convolutions' backward convert every gradient back)
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if cl else torch.contiguous_format
    grad, x = grad.detach().contiguous(memory_format=layout), x.detach().contiguous(memory_format=layout)
    out = torch.empty_like(x)
    flat = (lambda t: t.permute(0, 2, 3, 1)) if cl else (lambda t: t)  # dense, in memory order
    if impl == "cpp":
        _backend.cpp_module().deeplift_rescale_relu_grad_cpu(flat(grad).numpy(), flat(x).numpy(), eps,
                                                             flat(out).numpy())
    else:
        from .kernels.deeplift import deeplift_rescale_relu_grad_triton
        deeplift_rescale_relu_grad_triton(flat(grad), flat(x), eps, flat(out))
    return out


def perturb_by_rank(x: torch.Tensor, ranks: torch.Tensor, step_begin: int, step_end: int,
                    features_in_step: int, baseline: torch.Tensor, channels_last: bool = False,
                    backend: str | None = None) -> torch.Tensor:
    """The perturbed copies of a range of pixel-flipping steps for a batch, in one pass.

    x: float ``[B, C, H, W]``; ranks: integer ``[B, H, W]`` (the order in which pixels are
    removed, all channels of a pixel together) or ``[B, C, H, W]`` (one rank per element);
    ties are allowed (region perturbation gives a region's pixels one rank). baseline: a
    tensor broadcastable to x. Step s removes every feature of rank ``< s * features_in_step``
    (step 0 is the clean image), so steps are cumulative as in Quantus ``PixelFlipping``.
    Returns ``[B * S, C, H, W]``, S = step_end - step_begin, image-major (copy ``b * S + i``
    is step ``step_begin + i`` of image b), of x's dtype on x's device; channels-last memory
    when ``channels_last`` (the layout the model runs fastest in on CPU).
    """
    check_tensor("x", x, ndim=4)
    check_tensor("ranks", ranks, ndim=(3, 4), floating=False)
    check_tensor("baseline", baseline)
    check_same_device(x=x, ranks=ranks, baseline=baseline)
    B, C, H, W = x.shape
    if tuple(ranks.shape) not in ((B, H, W), (B, C, H, W)):
        raise ValueError(f"ranks: expected [B, H, W] = {[B, H, W]} or [B, C, H, W] = {[B, C, H, W]}, "
                         f"got {list(ranks.shape)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step_begin, step_end, features_in_step)):
        raise TypeError("step_begin, step_end, features_in_step: expected ints")
    if not 0 <= step_begin <= step_end:
        raise ValueError(f"step_begin, step_end: expected 0 <= step_begin <= step_end, got {step_begin}, {step_end}")
    if features_in_step < 1:
        raise ValueError(f"features_in_step: expected >= 1, got {features_in_step}")
    try:
        baseline = baseline.to(x.dtype).expand_as(x)
    except RuntimeError:
        raise ValueError(f"baseline: expected a tensor broadcastable to x's shape {tuple(x.shape)}, "
                         f"got shape {tuple(baseline.shape)}") from None
    layout = torch.channels_last if channels_last else torch.contiguous_format
    impl = _backend.choose("perturb_by_rank", x, backend)
    if impl == "reference":
        return perturb_by_rank_ref(x, ranks, step_begin, step_end, features_in_step,
                                   baseline).contiguous(memory_format=layout)
    S = step_end - step_begin
    out = torch.empty((B * S, C, H, W), dtype=x.dtype, device=x.device, memory_format=layout)
    if out.numel() == 0:  # an empty range: no kernel launch (Triton refuses an empty grid)
        return out

    def rows(t):  # [B, E] in the output's element order
        t = t.permute(0, 2, 3, 1) if channels_last and t.dim() == 4 else t
        return t.detach().contiguous().view(t.shape[0], -1)

    args = (rows(x), rows(ranks.long()), step_begin, step_end, features_in_step, rows(baseline), C, channels_last)
    flat = out.permute(0, 2, 3, 1) if channels_last else out
    flat = flat.view(B * S, -1)  # a view of out's memory in its own order
    if impl == "cpp":
        _backend.cpp_module().perturb_by_rank_cpu(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args),
                                                 flat.numpy())
    else:
        from .kernels.perturb import perturb_by_rank_triton
        perturb_by_rank_triton(*args, flat)
    return out
class _GramFunction(torch.autograd.Function):
    """gram on the C++ or Triton backend, with the backward on the same backend."""

    @staticmethod
    def forward(ctx, features, impl):
        B, C, H, W = features.shape
        flat = features.detach().contiguous().view(B, C, H * W)
        scale = 1.0 / (C * H * W)
        out = torch.empty((B, C, C), dtype=features.dtype, device=features.device)
        if impl == "cpp":
            _backend.cpp_module().gram_cpu(flat.numpy(), out.numpy(), scale)
        else:
            from .kernels.gram import gram_triton
            gram_triton(flat, out, scale)
        ctx.save_for_backward(flat)
        ctx.impl, ctx.shape, ctx.scale = impl, features.shape, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(flat)
        if ctx.impl == "cpp":
            _backend.cpp_module().gram_backward_cpu(grad.numpy(), flat.numpy(), out.numpy(), ctx.scale)
        else:
            from .kernels.gram import gram_backward_triton
            gram_backward_triton(grad, flat, out, ctx.scale)
        return out.view(ctx.shape), None


def gram(features: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Gram matrices of feature maps, as Gatys et al. (2015, 2016) use them for texture synthesis
    and style transfer, with their backward (differentiable on every backend).

    features: float ``[B, C, H, W]`` on any device. Returns ``[B, C, C]`` of its dtype on its
    device: ``G[b, i, j] = sum_p F[b, i, p] F[b, j, p] / (C * H * W)`` over the ``H * W``
    positions ``p``. Convention: normalized by ``C * H * W`` (the mean over positions, divided
    again by C), so losses on layers of different widths and sizes are comparable; Gatys et al.
    put ``1 / (4 N^2 M^2)`` in the loss instead, and the PyTorch tutorial divides by
    ``B * C * H * W``. The C++ backend computes only the upper blocks of the symmetric result.
    """
    check_tensor("features", features, ndim=4)
    if min(features.shape[1:]) < 1:
        raise ValueError(f"features: expected C, H, W >= 1 (the normalization divides by C*H*W), got shape "
                         f"{tuple(features.shape)}")
    impl = _backend.choose("gram", features, backend)
    if impl == "reference":
        return gram_ref(features)
    return _GramFunction.apply(features, impl)
