"""Collapse diagnostics, live: what a logged training step says about the teacher and the features, and the
one warning a run gets when they show collapse for a sustained window (``docs/algorithm.md``, section 6).

DINO-style training collapses in two ways (Caron et al. 2021, section 5.3): to a uniform teacher (every image
gets the same flat distribution) or to one dimension (every image the same one-hot). Both also show as
features of low rank: every image mapped to (nearly) one point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["effective_rank", "CollapseWatch", "collapse_kind", "WINDOW"]

WINDOW = 5  # logged rows in a row that must show collapse before the warning (not a single noisy batch)


@torch.no_grad()
def effective_rank(x: Tensor, max_rows: int = 1024) -> float:
    """Effective rank (Roy and Vetterli 2007) of ``[N, D]`` features: ``exp`` of the entropy of the normalized
    singular values of the centred rows; 1 when every row is the same point up to scale along one direction,
    ``min(N, D)`` when they spread evenly. At most ``max_rows`` rows (the first ones) are used.

    Example:
        >>> import torch
        >>> from pwself.diagnostics import effective_rank
        >>> round(effective_rank(torch.randn(256, 8, generator=torch.Generator().manual_seed(0))), 1) > 7
        True
        >>> round(effective_rank(torch.randn(256, 1) @ torch.randn(1, 8)), 2)
        1.0
    """
    x = x.reshape(-1, x.shape[-1])[:max_rows].double()
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    if float(s.sum()) == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


def collapse_kind(entropy: float, mean_entropy: float, out_dim: int, rank_cls: float | None = None) -> str:
    """'' or which collapse one logged step shows: teacher entropies in nats, the CLS features' effective rank."""
    log_k = math.log(out_dim)
    if mean_entropy < 0.1 * log_k:
        return "one dimension dominates every image: the teacher's batch-mean entropy is near 0"
    if entropy > 0.98 * log_k:
        return "uniform teacher: every image's distribution is near uniform"
    if rank_cls is not None and rank_cls < 1.5:
        return f"every image has nearly the same CLS feature (effective rank {rank_cls:.2f})"
    return ""


FIXES = ("a lower optim.lr, a higher loss.teacher_temp (or a longer loss.warmup_teacher_temp_epochs), "
         "loss.centering=sinkhorn, loss.koleo_weight=0.1 or more local crops (views.n_local)")


@dataclass
class CollapseWatch:
    """Counts logged rows that show collapse in a row; says so once, after :data:`WINDOW` of them."""

    streak: int = 0
    warned: bool = False

    def update(self, kind: str) -> bool:
        """Whether to warn now (the first time the streak reaches the window)."""
        self.streak = self.streak + 1 if kind else 0
        if self.streak >= WINDOW and not self.warned:
            self.warned = True
            return True
        return False
