"""Occlusion maps (Zeiler & Fergus, ECCV 2014) as Captum's ``Occlusion`` computes them.

The sweep never loops over positions on the host: one kernel writes the occluded copies of a
chunk of (image, window) pairs straight into the batch buffer, the model scores the chunk,
and a second kernel scatters the score drops and their counts into the map. ``incremental``
reuses the clean image's activations (Krypton, Nakandala et al., SIGMOD 2019) and
``approximate`` adds Krypton's projective-field threshold and adaptive drill-down.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_choice, check_finite, check_number, pair
from .._hooks import explanation, layout_probe
from .._precision import check_compute_dtype
from .._progress import progress_bar
from .._targets import target_indices, target_scores

_MODES = ("exact", "incremental", "approximate")
# Chunks on CPU: past a few dozen copies per forward pass, larger batches stop paying off.
_CPU_MEMORY_BUDGET = 1 << 30


def _window_positions(H: int, W: int, window, stride) -> torch.Tensor:
    """(top, left) of every window, ``[P, 2]`` long, in Captum's order (top varies fastest).

    As Captum's ``Occlusion``: ``ceil((H - h) / s) + 1`` shifts per axis starting at 0, so
    the last windows may run past the border and are clipped there.
    """
    (wh, ww), (sh, sw) = window, stride
    tops = torch.arange(-(-(H - wh) // sh) + 1) * sh
    lefts = torch.arange(-(-(W - ww) // sw) + 1) * sw
    return torch.stack([tops.repeat(len(lefts)), lefts.repeat_interleave(len(tops))], 1)


def _expand_baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    """A scalar, ``C`` per-channel values, or a tensor broadcastable to ``x`` -> ``[B, C, H, W]``."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, check_number("baseline", baseline))
    if isinstance(baseline, (list, tuple)):
        baseline = torch.tensor(baseline, dtype=x.dtype, device=x.device)
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"baseline: expected a number, per-channel values or a tensor, got "
                        f"{type(baseline).__name__}")
    if baseline.device != x.device:
        raise ValueError(f"baseline: is on {baseline.device} but x is on {x.device}")
    check_finite("baseline", baseline)
    b = baseline.to(x.dtype)
    if b.dim() == 1 and b.shape[0] == x.shape[1]:
        b = b[:, None, None]
    try:
        ok = b.dim() <= 4 and torch.broadcast_shapes(b.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"baseline: expected a scalar, {x.shape[1]} per-channel values or a tensor "
                         f"broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(baseline.shape)}")
    return b.expand_as(x).contiguous()


def _window_means(maps: torch.Tensor, positions: torch.Tensor, window) -> torch.Tensor:
    """Mean of ``maps [B, k, H, W]`` over each clipped window: ``[B, P, k]`` (integral image)."""
    H, W = maps.shape[-2:]
    S = F.pad(maps.double().cumsum(2).cumsum(3), (1, 0, 1, 0))
    r0, c0 = positions[:, 0], positions[:, 1]
    r1, c1 = (r0 + window[0]).clamp(max=H), (c0 + window[1]).clamp(max=W)
    total = S[..., r1, c1] - S[..., r0, c1] - S[..., r1, c0] + S[..., r0, c0]
    return (total / ((r1 - r0) * (c1 - c0))).to(maps.dtype).transpose(1, 2)


class _Sweep:
    """One image batch's occlusion sweep: the clean scores, and score drops for any list of
    (image, window) pairs by batched full inference or by incremental inference."""

    def __init__(self, model, x, target, window, baseline, batch_size=None, backend=None,
                 incremental=False, tau=None, memory_budget=None, compute_dtype=None, bar=None):
        self.model, self.x, self.target, self.window = model, x, target, window
        self.bar = bar  # a progress bar counting evaluated windows, or None
        self.base = _expand_baseline(baseline, x)
        self.backend, self.batch_size = backend, batch_size
        # one incremental engine per image, built once (its clean pass gives the clean output)
        self.engines = self._engines(tau, compute_dtype) if incremental else None
        if self.engines is None and compute_dtype not in (None, x.dtype):
            self.model = _Cast(copy.deepcopy(model).to(compute_dtype), compute_dtype)
        if self.engines is not None:
            output = torch.cat([engine.output for engine in self.engines])
        else:
            output, per_sample_bytes = self._clean_forward()
        self.clean = target_scores(output, target)
        self.k_axis = self.clean.dim() == 2
        self.clean = self.clean if self.k_axis else self.clean[:, None]
        self.indices = None if callable(target) else target_indices(target, x.shape[0], output.shape[1], x.device)
        if batch_size is None and self.engines is None:
            if memory_budget is None:
                memory_budget = (torch.cuda.mem_get_info(x.device)[0] // 2 if x.is_cuda
                                 else _CPU_MEMORY_BUDGET)
            batch_size = max(1, int(memory_budget // per_sample_bytes))
        self.chunk = batch_size

    def _engines(self, tau, compute_dtype):
        """Incremental engines of every image, or None (with a warning) for an untraceable model."""
        from ._incremental import UnsupportedModel, incremental_engine
        try:
            cache = {}  # the images' engines share converted weights
            return [incremental_engine(self.model, image, tau, compute_dtype, cache) for image in self.x]
        except UnsupportedModel as err:
            warnings.warn(f"occlusion: incremental inference does not support layer {err.layer!r}; "
                          f"falling back to exact full inference", RuntimeWarning, stacklevel=4)
            return None

    def _clean_forward(self):
        """The clean output, and an upper bound of one sample's activation bytes (the sum of
        every leaf module's output) that sizes the chunks."""
        output, total, self.layout = layout_probe(self.model, self.x)
        sample = self.x.shape[1:].numel() * self.x.element_size()
        return output, max(total // max(self.x.shape[0], 1), sample) + sample

    def _drops_of(self, output, image_index):
        """``[n, k]`` drops: clean score minus the occluded copies' scores."""
        target = self.target if self.indices is None else self.indices[image_index]
        scores = target_scores(output, target)
        scores = scores if scores.dim() == 2 else scores[:, None]
        return self.clean[image_index] - scores

    def _full_drops(self, image_index, positions):
        drops, buffer = [], None
        for start in range(0, len(image_index), self.chunk):
            idx, pos = image_index[start:start + self.chunk], positions[start:start + self.chunk]
            if buffer is None:
                buffer = torch.empty((len(idx), *self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device)
            copies = ops.occlusion_copies(self.x, self.base, idx, pos, self.window, out=buffer[:len(idx)],
                                          backend=self.backend)
            drops.append(self._drops_of(self.model(copies.contiguous(memory_format=self.layout)), idx))
            self._advance(len(idx))
        return torch.cat(drops) if drops else self.clean.new_empty((0, self.clean.shape[1]))

    def _incremental_drops(self, image_index, positions):
        drops = torch.empty((len(image_index), self.clean.shape[1]), dtype=self.clean.dtype, device=self.x.device)
        for b, engine in enumerate(self.engines):
            sel = (image_index == b).nonzero().squeeze(1)
            if len(sel):
                out = engine.outputs(self.base[b], positions[sel], self.window, batch_size=self.batch_size)
                drops[sel] = self._drops_of(out, image_index[sel])
                self._advance(len(sel))
        return drops

    def _advance(self, windows):
        if self.bar is not None:
            self.bar.update(windows)

    def drops(self, image_index, positions):
        """Score drops ``[n, k]`` of the windows at ``positions [n, 2]`` of images ``image_index [n]``."""
        if self.engines is not None:
            return self._incremental_drops(image_index, positions)
        return self._full_drops(image_index, positions)

    def average(self, image_index, positions, drops):
        """Captum's map ``[B, k, H, W]``: each pixel's drops averaged over the windows covering it."""
        B, _, H, W = self.x.shape
        sums = torch.zeros((B, drops.shape[1], H, W), dtype=drops.dtype, device=drops.device)
        counts = torch.zeros((B, H, W), dtype=drops.dtype, device=drops.device)
        ops.occlusion_scatter(drops, image_index, positions, self.window, sums, counts, backend=self.backend)
        return sums / counts[:, None]

    def pairs(self, positions):
        """Every (image, window) pair of the batch: ``image_index [B*P]``, ``positions [B*P, 2]``."""
        B = self.x.shape[0]
        return torch.arange(B, device=self.x.device).repeat_interleave(len(positions)), positions.repeat(B, 1)

    def drill_down(self, fine, coarse, coarse_stride, refine_fraction):
        """Krypton's adaptive drill-down: every coarse window is evaluated, then only the
        ``refine_fraction`` of fine windows with the largest estimated drops; the other fine
        windows take the coarse map's mean over them. Fine windows that are also coarse
        windows reuse the coarse drops."""
        B, P = self.x.shape[0], len(fine)
        coarse_drops = self.drops(*self.pairs(coarse))
        estimate = _window_means(self.average(*self.pairs(coarse), coarse_drops), fine, self.window)
        drops = estimate.clone()
        last = coarse.max(0).values
        shared = ((fine % torch.tensor(coarse_stride, device=fine.device) == 0) & (fine <= last)).all(1)
        n_tops = int(last[0]) // coarse_stride[0] + 1
        coarse_id = fine[:, 0] // coarse_stride[0] + fine[:, 1] // coarse_stride[1] * n_tops
        drops[:, shared] = coarse_drops.view(B, len(coarse), self.clean.shape[1])[:, coarse_id[shared]]
        n_refine = math.ceil(refine_fraction * P)
        if n_refine:
            chosen = torch.zeros((B, P), dtype=torch.bool, device=fine.device)
            chosen.scatter_(1, estimate.amax(2).topk(n_refine, dim=1).indices, True)
            b_idx, f_idx = (chosen & ~shared).nonzero(as_tuple=True)
            if len(b_idx):
                drops[b_idx, f_idx] = self.drops(b_idx, fine[f_idx])
        return self.average(*self.pairs(fine), drops.reshape(B * P, self.clean.shape[1]))


class _Cast(nn.Module):
    """A model converted to ``dtype`` that takes and returns tensors in the caller's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        return self.model(x.to(self.dtype)).to(x.dtype)


def _check_stride(name, stride, window, H, W):
    if any(s > w and w < d for s, w, d in zip(stride, window, (H, W))):
        raise ValueError(f"{name}: {stride} exceeds the window {window}; pixels between windows "
                         f"would never be occluded (Captum's rule: stride <= window)")


@explanation
def occlusion(model: nn.Module, x: torch.Tensor, target, window=16, stride=8, baseline=0.0,
              mode: str = "exact", batch_size: int | None = None, backend: str | None = None, *,
              tau: float | None = 0.5, coarse_stride=None, refine_fraction: float = 0.25,
              compute_dtype: torch.dtype | None = None, memory_budget: int | None = None,
              progress: bool | None = None) -> torch.Tensor:
    """Occlusion map (Zeiler & Fergus 2014): how much the target score drops when a window of
    the image is replaced by a baseline, averaged over the windows covering each pixel.

    Equals Captum's ``Occlusion(model).attribute(x, target=t, sliding_window_shapes=(C, h, w),
    strides=(C, sh, sw), baselines=b)[:, 0]`` (within float32 rounding), borders included:
    windows start at 0 every ``stride`` pixels, ``ceil((H - h) / sh) + 1`` per axis, and the
    last ones are clipped at the border.  With ``s_t`` the target score,
    ``map[i, j] = mean over windows w covering (i, j) of s_t(x) - s_t(x with w <- baseline)``.

    model: any module mapping ``[n, C, H, W]`` to ``[n, classes]`` (or to what a callable
    target scores); explained in eval mode and left as found (see ``_hooks.explaining``).
    x: float ``[B, C, H, W]`` on the model's device. target: an int, one int per sample, a
    ``[B, k]`` tensor of classes, or a callable ``f(output [n, ...]) -> [n]`` scoring each row
    of a batch independently. window, stride: an int or ``(h, w)``; ``stride <= window``
    (Captum's rule). baseline: a number, ``C`` per-channel values, or a tensor broadcastable
    to ``x``. batch_size: occluded copies per forward pass; None sizes chunks from
    ``memory_budget`` bytes (default half the free GPU memory, 1 GiB on CPU), bounded by the
    sum of every leaf module's output per sample. backend: the sweep kernels' backend
    (reference, cpp, triton; default by device).

    mode:
      - ``"exact"``: full inference on batched occluded copies, many images per chunk; on
        CPU the copies are channels-last (oneDNN's faster layout) unless the model fails on
        such a tensor, then channels-first.
      - ``"incremental"``: the same numbers (max abs difference within 1e-4 of the map's
        range) by incremental inference: only each window's projective field is recomputed
        from the clean activations (``cnnviz_fast.explain._incremental``). A model whose
        ``torch.fx`` trace fails falls back to ``"exact"`` with a warning naming the layer;
        a traced layer it does not support (e.g. upsampling) runs on full maps from there
        on, with a warning naming it. ``batch_size=None`` lets the engine pick its batches
        (at most 16 windows on CPU, 64 on CUDA, within 2 GiB for three of the largest activation).
        Memory: every image's clean activations (all layer outputs) are kept for the call.
      - ``"approximate"``: Krypton's approximations, trading accuracy for speed:
        ``tau`` caps each window's projective-field growth at this fraction of every map
        (incremental inference with the cap; ``None`` evaluates windows by exact full
        inference); ``coarse_stride`` (default ``min(2 * stride, window)``) and
        ``refine_fraction`` (default 0.25) drive the adaptive drill-down: all windows at the
        coarse stride, then only the top ``refine_fraction`` of fine-stride windows ranked by
        the coarse map, the rest estimated by the coarse map's mean over the window.
        ``compute_dtype`` (e.g. ``torch.bfloat16``; default None: ``x``'s dtype) runs the body
        of the network (every layer before its head of flatten / linear / global pooling) on
        converted copies of its modules and the head in ``x``'s dtype, its Linear layers
        applying ``compute_dtype`` weights to the change from the clean input only, so the
        scores are never rounded to ``compute_dtype``: their rounding (2**-8 of a score in
        bfloat16) would swamp the small drops. The model itself is left as it is; the copies,
        made once per call, cost the body's parameters and the head's Linear weights again at
        that precision. On CPUs with AVX-512 BF16 and on GPUs, about twice the convolution
        throughput (``bench_occlusion.py``, random weights, whole maps: VGG16 2.0x faster than
        the float32 incremental map at SSIM 0.985, ResNet-18 1.7x at SSIM 0.993). With
        ``tau=None`` (windows by full inference) or a model that cannot be traced, the whole
        model runs in ``compute_dtype``, its scores included: far less accurate.
        ``refine_fraction=1`` with ``tau=None`` is exact. These knobs are ignored by the other modes.

    progress: a tqdm bar of evaluated windows on stderr; None (default) shows it on an
    interactive terminal once the sweep has taken a few seconds (``cnnviz_fast._progress``).

    Returns ``[B, H, W]``, or ``[B, k, H, W]`` for ``[B, k]`` targets, in the score's dtype on
    ``x``'s device.
    """
    H, W = x.shape[-2:]
    window, stride = pair("window", window), pair("stride", stride)
    if window[0] > H or window[1] > W:
        raise ValueError(f"window: {window} is larger than the {H}x{W} image")
    _check_stride("stride", stride, window, H, W)
    check_choice("mode", mode, _MODES)
    check_number("batch_size", batch_size, 1, integer=True, none=True)
    check_number("memory_budget", memory_budget, 1, none=True)
    if mode == "approximate":
        coarse_stride = pair("coarse_stride", coarse_stride if coarse_stride is not None else
                             tuple(min(2 * s, w) for s, w in zip(stride, window)))
        _check_stride("coarse_stride", coarse_stride, window, H, W)
        check_number("tau", tau, 0, 1, low_open=True, none=True)
        check_number("refine_fraction", refine_fraction, 0, 1)
        compute_dtype = check_compute_dtype(compute_dtype)
    else:
        tau = compute_dtype = None
    # an empty batch has no image to build an engine from; its (empty) sweep runs exact
    incremental = len(x) > 0 and (mode == "incremental" or (mode == "approximate" and tau is not None))
    fine = _window_positions(H, W, window, stride).to(x.device)
    total = None if mode == "approximate" else x.shape[0] * len(fine)  # drill-down: known as it goes
    with torch.no_grad(), progress_bar(progress, "occlusion", total, "window") as bar:
        sweep = _Sweep(model, x, target, window, baseline, batch_size, backend, incremental, tau, memory_budget,
                       compute_dtype, bar)
        if mode == "approximate":
            coarse = _window_positions(H, W, window, coarse_stride).to(x.device)
            maps = sweep.drill_down(fine, coarse, coarse_stride, refine_fraction)
        else:
            pairs = sweep.pairs(fine)
            maps = sweep.average(*pairs, sweep.drops(*pairs))
    return maps if sweep.k_axis else maps[:, 0]
