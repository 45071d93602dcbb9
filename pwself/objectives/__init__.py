"""Objectives: one module each, and this registry, the only list of their names.

Adding an objective is one module with an :class:`Objective` subclass (its own knobs as a dataclass in
``Options``, and its reference test) plus one line in :data:`OBJECTIVES` (or :func:`register_objective`);
config validation, ``pwself config show``, the CLI, ``compare`` and the help text read the registry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pwself.models import HeadConfig
from pwself.objectives.bagssl import BagSSL
from pwself.objectives.base import LossConfig, Objective, Selection
from pwself.objectives.cossl import COSSL
from pwself.objectives.dino import DINO
from pwself.objectives.ibot import IBOT, PWMLiBOT
from pwself.objectives.logo import LoGo
from pwself.objectives.patchwise import PWLL, PWML, PWSL
from pwself.sections import ConfigError
from pwself.views import ViewConfig

__all__ = ["OBJECTIVES", "DEFAULT_OBJECTIVE", "Objective", "Selection", "objective_class", "build_objective",
           "register_objective", "options_section", "check_objective", "RECIPES", "objective_overrides"]

OBJECTIVES: dict[str, type[Objective]] = {
    "dino": DINO,
    "pwml": PWML,
    "pwsl": PWSL,
    "pwll": PWLL,
    "cossl": COSSL,
    "logo": LoGo,
    "bagssl": BagSSL,
    "ibot": IBOT,
    "pwml_ibot": PWMLiBOT,
}
DEFAULT_OBJECTIVE = LossConfig().objective

RECIPES: dict[str, tuple[str, ...]] = {
    # DINOv2's training loss (docs/algorithm.md, section 5): DINO + iBOT with its own patch head + KoLeo, the
    # teacher's targets made by Sinkhorn-Knopp as in DINOv2's training.
    "dinov2": ("loss.objective=ibot", "loss.koleo_weight=0.1", "head.patch_head=separate", "loss.centering=sinkhorn"),
    # The same with DINO's EMA centering: the recipe RESULTS.md's dense study measured under the name dinov2.
    "dinov2_ema": ("loss.objective=ibot", "loss.koleo_weight=0.1", "head.patch_head=separate"),
}
"""Named settings of several keys, usable wherever an objective name is (``--objective``, ``--objectives``)."""


def objective_overrides(name: str) -> list[str]:
    """The ``KEY=VALUE`` settings that select ``name``: a recipe's (and ``recipe=NAME``, so that the run records
    the name its user chose), or ``loss.objective=NAME``."""
    return [*RECIPES[name], f"recipe={name}"] if name in RECIPES else [f"loss.objective={name}", "recipe="]


def register_objective(name: str, cls: type[Objective]) -> None:
    """Add an objective from outside the package (a plugin, a test): the same as a line in :data:`OBJECTIVES`."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"objective {name!r} must be an Objective subclass, got {cls!r}")
    if not name.isidentifier():  # its knobs are a config section: objectives.NAME.KNOB
        raise ValueError(f"objective name {name!r} must be a Python identifier (letters, digits, _)")
    OBJECTIVES[name] = cls


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; ``ValueError`` naming the valid choices otherwise."""
    if name in RECIPES:
        return objective_class(dict(o.split("=", 1) for o in RECIPES[name])["loss.objective"])
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: use one of {', '.join([*OBJECTIVES, *RECIPES])}")
    return OBJECTIVES[name]


def options_section() -> type:
    """The ``objectives`` config section: one sub-section per registered objective that has ``Options``
    (``objectives.logo.weight``, ...), built from the registry as it is now."""
    return _options_section(tuple((n, c.Options) for n, c in OBJECTIVES.items() if c.Options is not None))


@functools.cache
def _options_section(entries: tuple[tuple[str, type], ...]) -> type:
    fields = [(name, opts, dataclasses.field(default_factory=opts)) for name, opts in entries]
    doc_lines = "\n".join(f"        {name}: {(opts.__doc__ or '').strip().splitlines()[0]}" for name, opts in entries)
    cls = dataclasses.make_dataclass("ObjectiveOptions", fields)
    intro = "Each objective's own knobs; only the trained objective's are read."
    cls.__doc__ = f"{intro}\n\n    Attributes:\n{doc_lines}\n"
    return cls


def check_objective(loss: LossConfig, views: ViewConfig, head: HeadConfig, options: Any) -> None:
    """Raise :class:`~pwself.sections.ConfigError` unless ``loss.objective`` is registered, can train on these
    views and head, and every objective's options are in range."""
    if loss.objective not in OBJECTIVES:
        recipes = f" (recipes go in --objective: {', '.join(RECIPES)})" if RECIPES else ""
        raise ConfigError(f"loss.objective={loss.objective!r}: use one of {', '.join(OBJECTIVES)}{recipes}")
    problem = OBJECTIVES[loss.objective].config_problem(views, head, loss)
    if problem:
        raise ConfigError(f"loss.objective={loss.objective}: {problem}")
    for f in dataclasses.fields(options):
        section = getattr(options, f.name)
        if hasattr(section, "validate"):
            section.validate(f"objectives.{f.name}")


def build_objective(loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                    options: Any = None) -> Objective:
    """The objective ``loss.objective`` built from the ``loss`` config section (``patch_out_dim``: the patch
    head's output size, when it has its own; ``options``: the ``objectives`` section, whose entry of this
    objective it takes)."""
    own = getattr(options, loss.objective, None) if options is not None else None
    return objective_class(loss.objective)(loss, out_dim, embed_dim, patch_out_dim, own)
