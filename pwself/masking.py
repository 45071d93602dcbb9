"""Block-wise masks of the student's global crops for masked patch distillation (iBOT, DINOv2; docs/algorithm.md §5).

Written after dinov2's ``MaskingGenerator`` and ``collate_data_and_cast`` (BEiT's blockwise masking), with the
random numbers drawn from a torch ``Generator`` (dinov2 uses Python's ``random``) so one seed fixes a run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_mask", "draw_masks"]


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator | None, lo: int, hi: int) -> int:
    """Uniform in ``[lo, hi]``, both ends included (Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _add_block(mask: Tensor, max_patches: int, generator: torch.Generator | None, min_patches: int = 4,
               log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> int:
    """Grow ``mask`` ([rows, cols] bool, in place) by one rectangle of at most ``max_patches`` new cells;
    the cells added (0 when 10 draws add nothing)."""
    rows, cols = mask.shape
    for _ in range(10):
        target = _uniform(generator, min_patches, max_patches)
        aspect = math.exp(_uniform(generator, *log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < cols and h < rows:
            top, left = _randint(generator, 0, rows - h), _randint(generator, 0, cols - w)
            block = mask[top: top + h, left: left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block.fill_(True)
                return new
    return 0


def block_mask(grid: tuple[int, int], n_masked: int, generator: torch.Generator | None = None) -> Tensor:
    """A ``[rows, cols]`` bool mask of about ``n_masked`` cells grown from BEiT-style rectangles, each at most
    half the grid (it stops early when 10 draws in a row add nothing)."""
    mask = torch.zeros(grid, dtype=torch.bool)
    cap, count = int(0.5 * grid[0] * grid[1]), 0
    while count < n_masked:
        added = _add_block(mask, min(n_masked - count, cap), generator)
        if added == 0:
            break
        count += added
    return mask


def draw_masks(n_crops: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5),
               probability: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Masks of ``n_crops`` global crops as dinov2's collate draws them: ``floor(n_crops * probability)`` crops
    are masked, crop ``i`` of them at a ratio drawn uniformly in the ``i``-th of equal bins of ``ratio``, the
    rest unmasked, then the order is shuffled. Returns ``[n_crops, rows * cols]`` bool.

    Example:
        >>> import torch, pwself
        >>> masks = pwself.draw_masks(8, (14, 14), generator=torch.Generator().manual_seed(0))
        >>> masks.shape, int((masks.sum(1) > 0).sum())  # half of the crops masked
        (torch.Size([8, 196]), 4)
    """
    n_tokens, n_masked = grid[0] * grid[1], int(n_crops * probability)
    bounds = torch.linspace(ratio[0], ratio[1], n_masked + 1, dtype=torch.float64).tolist()
    masks = [block_mask(grid, int(n_tokens * _uniform(generator, bounds[i], bounds[i + 1])), generator)
             for i in range(n_masked)]
    masks += [torch.zeros(grid, dtype=torch.bool)] * (n_crops - n_masked)
    order = torch.randperm(n_crops, generator=generator)
    return torch.stack([masks[i] for i in order.tolist()]).flatten(1)
