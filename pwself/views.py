"""Multi-crop spatial augmentation with the crop geometry kept beside every view (docs/algorithm.md §1).

Every sample of the batch draws its own crops (no crop shared by the batch). All views of one kind are
cut and resized in a single batched :func:`torchvision.ops.roi_align` call, then flipped with
``torch.where``; no per-image Python work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_align

from pwself.sections import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, check_interval, check_ranges

__all__ = ["MultiCrop", "MultiCropViews", "sample_boxes", "crop_and_resize"]


CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of every crop (torchvision's RandomResizedCrop default)


@dataclass
class ViewConfig:
    """Multi-crop views (docs/algorithm.md §1); sizes in pixels, multiples of the patch size.

    Attributes:
        n_global: Global views (seen by teacher and student).
        n_local: Local views (student only; 0 for none).
        global_size: Side of a global view; also the backbone's nominal input size.
        local_size: Side of a local view.
        global_scale: Area range of global crops, as fractions of the image.
        local_scale: Area range of local crops.
        flip_p: Probability of a horizontal flip per view.
    """

    n_global: int = 2
    n_local: int = 6
    global_size: int = 28
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    flip_p: float = 0.5

    def validate(self, patch_size: int) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for views a ViT of this patch size cannot take."""
        check_ranges(self, "views", {"global_size": POSITIVE, "local_size": POSITIVE, "n_local": NON_NEGATIVE,
                                     "flip_p": FRACTION})
        check_interval("views.global_scale", self.global_scale, upper=1)
        check_interval("views.local_scale", self.local_scale, upper=1)
        for name, size in (("views.global_size", self.global_size), ("views.local_size", self.local_size)):
            if size % patch_size:
                raise ConfigError(f"{name}={size} is not a multiple of the patch size {patch_size}: use a multiple "
                                  f"of {patch_size}")
            if size < patch_size:
                raise ConfigError(f"{name}={size} is smaller than the patch size {patch_size}")
        if self.n_local and self.local_size >= self.global_size:
            raise ConfigError(f"views.local_size={self.local_size} must be smaller than "
                              f"views.global_size={self.global_size}")
        if self.n_global < 1 or self.n_global + self.n_local < 2:
            raise ConfigError("need at least 1 global view and 2 views in total (views.n_global, views.n_local)")


@dataclass(frozen=True)
class MultiCropViews:
    """The views of a batch and where each came from.

    Attributes:
        global_crops: ``[G * B, C, Sg, Sg]``, view-major (all samples of global view 0 first).
        local_crops: ``[L * B, C, Sl, Sl]``, view-major; ``L`` may be 0.
        boxes: ``[G + L, B, 4]`` float crop boxes ``(x0, y0, x1, y1)`` in original-image pixels.
        flips: ``[G + L, B]`` bool, horizontal flip applied after the crop.
        n_global: ``G``.
        n_local: ``L``.
    """

    global_crops: Tensor
    local_crops: Tensor
    boxes: Tensor
    flips: Tensor
    n_global: int
    n_local: int

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[1]


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Random-resized-crop boxes, torchvision's rule, vectorized over ``n`` draws.

    Like :meth:`torchvision.transforms.RandomResizedCrop.get_params`: up to ``attempts`` (area, aspect)
    draws per box, the first that fits the image wins; otherwise a central crop with the ratio clamped.
    Boxes are continuous (no rounding) since the crop is resampled with ``roi_align`` anyway.

    Args:
        n: Number of boxes.
        height: Image height in pixels.
        width: Image width in pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the aspect ratio ``w / h``.
        generator: Random generator (CPU).
        attempts: Draws per box before the fallback.

    Returns:
        ``[n, 4]`` float boxes ``(x0, y0, x1, y1)`` with ``0 <= x0 < x1 <= width``.
    """
    area = height * width
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(target_area * aspect)
    h = torch.sqrt(target_area / aspect)
    ok = (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.int().argmax(1), torch.full((n,), -1))
    has = first >= 0
    pick = first.clamp(min=0)[:, None]
    w_sel, h_sel = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    x0 = (width - w_sel) * u[..., 2].gather(1, pick)[:, 0]
    y0 = (height - h_sel) * u[..., 3].gather(1, pick)[:, 0]

    # Fallback: whole image with the aspect ratio clamped into range (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        fw, fh = height * max(ratio), float(height)
    else:
        fw, fh = float(width), float(height)
    fx0, fy0 = (width - fw) / 2, (height - fh) / 2
    x0 = torch.where(has, x0, torch.full_like(x0, fx0))
    y0 = torch.where(has, y0, torch.full_like(y0, fy0))
    w_sel = torch.where(has, w_sel, torch.full_like(w_sel, fw))
    h_sel = torch.where(has, h_sel, torch.full_like(h_sel, fh))
    return torch.stack([x0, y0, x0 + w_sel, y0 + h_sel], 1).float()


def crop_and_resize(images: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None) -> Tensor:
    """Cut every box out of its image, resize to ``size x size`` and optionally flip.

    ``roi_align`` with ``aligned=True`` treats pixel ``i`` as the interval ``[i, i + 1)``, matching the
    box convention, and averages ``ceil(box / size)`` bilinear samples per output pixel per axis, which
    anti-aliases downscaling. An integer box of side ``size`` is an exact copy of the pixels.

    Args:
        images: ``[B, C, H, W]`` float images.
        boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels of ``images``; box ``b`` cuts image ``b``.
        size: Output side in pixels.
        flips: Optional ``[B]`` bool; flipped crops are mirrored left-right.

    Returns:
        ``[B, C, size, size]`` crops.
    """
    idx = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(images)], 1)
    out = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flips is not None:
        out = torch.where(flips.to(out.device)[:, None, None, None], out.flip(-1), out)
    return out


class MultiCrop:
    """``n_global`` global and ``n_local`` local random-resized crops with horizontal flip, per sample.

    Args:
        n_global: Number of global views (teacher and student).
        n_local: Number of local views (student only).
        global_size: Side of global views in pixels (multiple of the patch size).
        local_size: Side of local views in pixels.
        global_scale: Area range of global crops.
        local_scale: Area range of local crops.
        ratio: Aspect-ratio range.
        flip_p: Probability of a horizontal flip.

    Example:
        >>> import torch, pwself
        >>> views = pwself.MultiCrop(2, 6, 28, 16)(torch.rand(4, 1, 32, 32), torch.Generator().manual_seed(0))
        >>> views.global_crops.shape, views.local_crops.shape, views.boxes.shape
        (torch.Size([8, 1, 28, 28]), torch.Size([24, 1, 16, 16]), torch.Size([8, 4, 4]))
    """

    def __init__(
        self,
        n_global: int = 2,
        n_local: int = 6,
        global_size: int = 28,
        local_size: int = 16,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = CROP_RATIO,
        flip_p: float = 0.5,
    ) -> None:
        if n_global < 1:
            raise ValueError(f"n_global={n_global}: at least one global view is needed (the teacher sees them)")
        self.n_global, self.n_local = n_global, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio, self.flip_p = tuple(ratio), flip_p

    @classmethod
    def from_config(cls, views: ViewConfig) -> MultiCrop:
        """The multi-crop a run's ``views`` section describes."""
        return cls(views.n_global, views.n_local, views.global_size, views.local_size, views.global_scale,
                   views.local_scale, flip_p=views.flip_p)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> MultiCropViews:
        """Cut the views of a batch.

        Args:
            images: ``[B, C, H, W]`` float images on any device.
            generator: CPU random generator; all random draws come from it, so one seed fixes the views.

        Returns:
            The :class:`MultiCropViews` of the batch.
        """
        b, _, h, w = images.shape
        g, n_loc = self.n_global, self.n_local
        boxes_g = sample_boxes(g * b, h, w, self.global_scale, self.ratio, generator)
        boxes_l = sample_boxes(n_loc * b, h, w, self.local_scale, self.ratio, generator)
        flips = torch.rand((g + n_loc) * b, generator=generator) < self.flip_p
        rep = lambda n: images.repeat(n, 1, 1, 1)  # noqa: E731  view-major: [view0 samples, view1 samples, ...]
        dev = images.device
        global_crops = crop_and_resize(rep(g), boxes_g.to(dev), self.global_size, flips[: g * b])
        if n_loc:
            local_crops = crop_and_resize(rep(n_loc), boxes_l.to(dev), self.local_size, flips[g * b :])
        else:
            local_crops = images.new_zeros((0, images.shape[1], self.local_size, self.local_size))
        boxes = torch.cat([boxes_g, boxes_l]).view(g + n_loc, b, 4)
        return MultiCropViews(global_crops, local_crops, boxes, flips.view(g + n_loc, b), g, n_loc)
