"""DINO (Caron et al. 2021): CLS self-distillation, docs/algorithm.md §4 (the paper's Eq. 7). The base
objective is exactly DINO."""

from __future__ import annotations

from pwself.objectives.base import Objective

__all__ = ["DINO"]


class DINO(Objective):
    """Every (teacher global view, other student view) pair: ``H(t_cls, s_cls)``, averaged."""
