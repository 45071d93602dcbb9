"""Objectives: one module each, and this registry, the only list of their names.

Adding an objective is one module with an :class:`Objective` subclass (and its reference test) plus one
line in :data:`OBJECTIVES`; config validation, the CLI, ``compare`` and the help text read the registry.
"""

from __future__ import annotations

from pwself.objectives.bagssl import BagSSL
from pwself.objectives.base import LossConfig, Objective, Selection
from pwself.objectives.cossl import COSSL
from pwself.objectives.dino import DINO
from pwself.objectives.logo import LoGo
from pwself.objectives.patchwise import PWLL, PWML, PWSL

__all__ = ["OBJECTIVES", "DEFAULT_OBJECTIVE", "Objective", "Selection", "objective_class", "build_objective"]

OBJECTIVES: dict[str, type[Objective]] = {
    "dino": DINO,
    "pwml": PWML,
    "pwsl": PWSL,
    "pwll": PWLL,
    "cossl": COSSL,
    "logo": LoGo,
    "bagssl": BagSSL,
}
DEFAULT_OBJECTIVE = LossConfig().objective


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; ``ValueError`` naming the valid choices otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None) -> Objective:
    """The objective ``loss.objective`` built from the ``loss`` config section (``patch_out_dim``: the patch
    head's output size, when it has its own)."""
    return objective_class(loss.objective)(loss, out_dim, embed_dim, patch_out_dim)
