"""Photometric augmentation at image level and at patch level (docs/algorithm.md §2).

Photometric operators only: they never move a pixel, so the crop geometry used by the matcher stays
exact. In ``patch`` mode each ``p x p`` patch of a view is its own sample with its own operators and
parameters: ``[N, C, H, W]`` is reshaped to ``[N * T, C, p, p]``, augmented as one batch of per-sample
ops, and folded back. No Python loop over patches or samples.

Inputs are float images in ``[0, 1]`` (before normalization). Grayscale (1 channel) inputs skip the
operators that need colour (saturation, hue, grayscale conversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from kornia.enhance import adjust_hue
from kornia.filters import gaussian_blur2d
from torch import Tensor

from pwself.sections import FRACTION, check_choice, check_interval, check_ranges

PHOTOMETRIC_MODES = ("image", "patch", "none")  # photometric.mode

__all__ = ["PhotometricConfig", "PhotometricAugment", "to_patches", "from_patches"]

Mode = Literal["image", "patch", "none"]


@dataclass
class PhotometricConfig:
    """Probabilities and strengths of the photometric operators (DINO's recipe by default).

    Attributes:
        mode: ``image`` (whole view), ``patch`` (every patch independently) or ``none``.
        jitter_p: Probability of colour jitter.
        brightness: Brightness factor drawn from ``[1 - b, 1 + b]``.
        contrast: Contrast factor range half-width.
        saturation: Saturation factor range half-width (RGB only).
        hue: Hue shift range half-width, in turns (RGB only).
        grayscale_p: Probability of grayscale conversion (RGB only).
        blur_p: Probability of Gaussian blur.
        blur_sigma: Sigma range of the blur, in pixels.
        solarize_p: Probability of solarization (threshold 0.5).
        noise_p: Probability of additive Gaussian noise.
        noise_std: Maximum noise standard deviation (drawn uniformly in ``[0, noise_std]``).
    """

    mode: Mode = "patch"
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_p: float = 0.2
    noise_p: float = 0.2
    noise_std: float = 0.1

    def validate(self) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for a probability outside [0, 1] or an unknown mode."""
        check_choice("photometric.mode", self.mode, PHOTOMETRIC_MODES)
        check_ranges(self, "photometric", {k: FRACTION for k in ("jitter_p", "grayscale_p", "blur_p", "solarize_p",
                                                                 "noise_p")})
        check_interval("photometric.blur_sigma", self.blur_sigma)


def to_patches(x: Tensor, p: int) -> Tensor:
    """``[N, C, H, W]`` -> ``[N * (H/p) * (W/p), C, p, p]``, patches in row-major token order."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * (h // p) * (w // p), c, p, p)


def from_patches(x: Tensor, n: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`to_patches` for an ``[N, C, h, w]`` batch."""
    p, c = x.shape[-1], x.shape[1]
    x = x.view(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _per_sample(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


class PhotometricAugment:
    """Per-sample (or per-patch) photometric augmentation of a batch of views.

    Args:
        config: Operators and their probabilities; ``config.mode`` picks image/patch/none.
        patch_size: Patch side ``p`` used in ``patch`` mode.
    """

    def __init__(self, config: PhotometricConfig, patch_size: int) -> None:
        if config.mode not in PHOTOMETRIC_MODES:
            raise ValueError(f"photometric mode {config.mode!r}: use one of image, patch, none")
        self.config, self.patch_size = config, patch_size

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch of views.

        Args:
            x: ``[N, C, H, W]`` views in ``[0, 1]``; ``H`` and ``W`` multiples of the patch size in
                ``patch`` mode.
            generator: CPU generator from which every random parameter is drawn.

        Returns:
            ``[N, C, H, W]`` augmented views in ``[0, 1]``.
        """
        mode = self.config.mode
        if mode == "none" or x.shape[0] == 0:
            return x
        if mode == "image":
            return self.augment_samples(x, generator)
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"view of {h}x{w} px is not a multiple of the patch size {p}: pick sizes divisible by {p}")
        return from_patches(self.augment_samples(to_patches(x, p), generator), n, h, w)

    def draw(self, n: int, channels: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Draw the parameters of ``n`` samples (CPU tensors): which ops fire and with what strength."""
        cfg = self.config
        u = torch.rand(n, 12, generator=generator)
        lo_s, hi_s = cfg.blur_sigma
        return {
            "jitter": u[:, 0] < cfg.jitter_p,
            "brightness": 1 + cfg.brightness * (2 * u[:, 1] - 1),
            "contrast": 1 + cfg.contrast * (2 * u[:, 2] - 1),
            "saturation": 1 + cfg.saturation * (2 * u[:, 3] - 1),
            "hue": cfg.hue * (2 * u[:, 4] - 1),
            "grayscale": (u[:, 5] < cfg.grayscale_p) & (channels == 3),
            "blur": u[:, 6] < cfg.blur_p,
            "sigma": lo_s + (hi_s - lo_s) * u[:, 7],
            "solarize": u[:, 8] < cfg.solarize_p,
            "noise": u[:, 9] < cfg.noise_p,
            "noise_std": cfg.noise_std * u[:, 10],
        }

    def augment_samples(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply independently drawn operators to each of the ``N`` samples of ``[N, C, h, w]``."""
        n, c, h, w = x.shape
        prm = {k: v.to(x.device) for k, v in self.draw(n, c, generator).items()}

        # Colour jitter (fixed order brightness, contrast, saturation, hue), only where it fires.
        jit = _per_sample(prm["jitter"])
        y = x * _per_sample(prm["brightness"])
        y = y.clamp(0, 1)
        mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * _per_sample(prm["contrast"]) + mean).clamp(0, 1)
        if c == 3:
            y = ((y - _gray(y)) * _per_sample(prm["saturation"]) + _gray(y)).clamp(0, 1)
            y = adjust_hue(y, prm["hue"] * 2 * math.pi).clamp(0, 1)
        x = torch.where(jit, y, x)

        if c == 3:
            x = torch.where(_per_sample(prm["grayscale"]), _gray(x).expand_as(x), x)

        # Blur and noise only on the samples where they fire (p ~ 0.2), not on all and then `where`.
        blur_idx = prm["blur"].nonzero()[:, 0]
        k = min(2 * math.ceil(2 * self.config.blur_sigma[1]) + 1, 2 * ((min(h, w) - 1) // 2) + 1)
        if len(blur_idx) and k >= 3:
            sigma = prm["sigma"][blur_idx, None].expand(-1, 2).to(x.dtype)
            x[blur_idx] = gaussian_blur2d(x[blur_idx], (k, k), sigma)

        x = torch.where(_per_sample(prm["solarize"]) & (x >= 0.5), 1 - x, x)
        noise_idx = prm["noise"].nonzero()[:, 0]
        if len(noise_idx):
            # Drawn in float64: float32 randn rounds differently on other CPUs (vectorized log/sin), and float32
            # and float64 runs then draw the same noise.
            noise = torch.randn((len(noise_idx), c, h, w), generator=generator, dtype=torch.float64).to(x)
            x[noise_idx] = (x[noise_idx] + noise * _per_sample(prm["noise_std"][noise_idx])).clamp(0, 1)
        return x
