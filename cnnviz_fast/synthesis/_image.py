"""Image parametrizations and transformation robustness, as Lucent (``lucent.optvis.param``
and ``lucent.optvis.transform``, torch-lucent 0.1.8) defines them.

The Fourier image, its frequency scaling, the ``/ 4`` constant, the colour decorrelation
matrix and the sigmoid are Lucent's, so one seed gives Lucent's initial spectrum and steps.
Random transforms draw from a seeded ``torch.Generator`` instead of NumPy's global state.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Square root of ImageNet's colour correlation (Lucid's ``color_correlation_svd_sqrt``),
# scaled so its largest column norm is 1 (``color_correlation_normalized``).
_COLOR_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype="float32")
COLOR_CORRELATION = torch.from_numpy(_COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0)))
# Lucid's "magic" divisor of the Fourier image; a larger one lowers saturation.
_FOURIER_DIVISOR = 4.0
_INIT_SD = 0.01
# Inputs in [0, 1] are clamped this far inside before the inverse sigmoid.
_LOGIT_EPS = 1e-3

PARAMETRIZATIONS = ("fourier", "pixel")


def _fourier_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    """Lucent's ``1 / max(|f|, 1 / max(h, w)) ** decay_power`` per frequency, [h, wf, 1];
    for odd w it keeps one extra frequency that the inverse transform then ignores."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + 1 + w % 2]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power
    return torch.tensor(scale).float()[..., None]


class ImageParam:
    """N RGB images of size (h, w) in (0, 1) as a function of one trainable tensor ``param``.

    "fourier": ``param`` is a scaled spectrum ``[N, 3, h, wf, 2]`` (Lucent's ``fft_image``);
    "pixel": ``param`` is ``[N, 3, h, w]`` (Lucent's ``pixel_image``). Both go through the
    optional colour decorrelation and a sigmoid (Lucent's ``to_valid_rgb``).
    """

    def __init__(self, n, size, parametrization, decorrelate, generator, device, init=None, decay_power=1.0):
        self.h, self.w = size
        self.fourier = parametrization == "fourier"
        self.decorrelate = decorrelate
        self.color = COLOR_CORRELATION.to(device)
        self.scale = _fourier_scale(self.h, self.w, decay_power).to(device) if self.fourier else None
        if init is None:
            shape = (n, 3, *self.scale.shape[:2], 2) if self.fourier else (n, 3, self.h, self.w)
            # drawn on the CPU as Lucent does, so a seed gives the same values on every device
            param = torch.randn(shape, generator=generator) * _INIT_SD
        else:
            param = self._from_images(init.detach().float())
        self.param = param.to(device).requires_grad_(True)

    def _from_images(self, images):
        """The parameters whose image is ``images`` (clamped to [eps, 1 - eps])."""
        t = torch.logit(images.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))
        if self.decorrelate:
            t = torch.linalg.solve(self.color.to(t.device), t.permute(0, 2, 3, 1)[..., None])[..., 0]
            t = t.permute(0, 3, 1, 2)
        if not self.fourier:
            return t
        spectrum = torch.fft.rfftn(t * _FOURIER_DIVISOR, dim=(-2, -1), norm="ortho")
        spectrum = F.pad(spectrum, (0, self.scale.shape[1] - spectrum.shape[-1]))
        return torch.view_as_real(spectrum / self.scale[..., 0].to(t.device)).contiguous()

    def __call__(self) -> torch.Tensor:
        t = self.param
        if self.fourier:
            spectrum = torch.view_as_complex(self.scale * t)
            t = torch.fft.irfftn(spectrum, s=(self.h, self.w), norm="ortho") / _FOURIER_DIVISOR
        if self.decorrelate:
            t = (t.permute(0, 2, 3, 1) @ self.color.T).permute(0, 3, 1, 2)
        return torch.sigmoid(t)

    @torch.no_grad()
    def blur(self, sigma: float) -> None:
        """Gaussian blur of a pixel parametrization in place (Yosinski et al. 2015)."""
        radius = max(1, math.ceil(2 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=self.param.dtype, device=self.param.device)
        k = torch.exp(-x * x / (2 * sigma * sigma))
        k = k / k.sum()
        t = self.param
        c = t.shape[1]
        t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                     groups=c)
        t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                     groups=c)
        self.param.copy_(t)


def _choice(options, generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _pad(x, w):
    return F.pad(x, [w] * 4, mode="constant", value=0.5)


def _jitter(x, d, generator):
    """Shift right/down by (0..d-1) px, zeros entering (kornia ``translate`` by whole pixels)."""
    dx, dy = _choice(range(d), generator), _choice(range(d), generator)
    h, w = x.shape[-2:]
    return F.pad(x, (dx, 0, dy, 0))[..., :h, :w]


def _random_scale(x, scales, generator):
    scale = _choice(scales, generator)
    h, w = x.shape[-2:]
    sh, sw = math.ceil(scale * h), math.ceil(scale * w)
    pad_x, pad_y = max(0, math.ceil((w - sw) / 2)), max(0, math.ceil((h - sh) / 2))
    # Lucent pads [pad_y, pad_x] * 2 as (left, right, top, bottom)
    return F.pad(F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=True), [pad_y, pad_x] * 2)


def _random_rotate(x, angles, generator):
    angle = math.radians(_choice(angles, generator))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = x.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


_SCALES = [1 + (i - 5) / 50.0 for i in range(11)]
_ANGLES = list(range(-10, 11)) + 5 * [0]


def standard_transforms(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lucent's ``standard_transforms``: pad 12 px of grey, jitter 8 px, scale by 0.9..1.1,
    rotate by -10..10 degrees, jitter 4 px. One draw per step for the whole batch, as Lucent.
    The rotation uses ``grid_sample`` about the image centre (Lucent: kornia's
    ``warp_affine``), so rotated pixels agree to interpolation differences only."""
    x = _jitter(_pad(x, 12), 8, generator)
    x = _random_rotate(_random_scale(x, _SCALES, generator), _ANGLES, generator)
    return _jitter(x, 4, generator)
