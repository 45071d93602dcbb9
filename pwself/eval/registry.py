"""What an evaluation protocol is: one :class:`Protocol` object, defined in the protocol's own module (its settings,
flags, run and table side by side) and listed once in :data:`pwself.eval.protocols.PROTOCOLS`.

From that object alone pwself builds the protocol's ``pwself eval-NAME`` command and its place in ``pwself eval``,
runs it through :func:`pwself.eval.protocols.evaluate` (so ``compare --protocols`` and the in-training evaluation
reach it), and draws its table in the evaluation output and in a run's report.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Protocol", "no_flags", "settings_from_flags"]


def no_flags(parser: argparse.ArgumentParser, alone: bool) -> None:
    """A protocol with no flags of its own."""


def settings_from_flags(settings_class: type, args: argparse.Namespace) -> Any:
    """``settings_class`` filled from the flags of the same name; a flag that was not given keeps the field's
    default."""
    given = {f.name: getattr(args, f.name) for f in fields(settings_class) if getattr(args, f.name, None) is not None}
    return settings_class(**given)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: Its name (``pwself eval-NAME``, ``evaluate(..., [NAME])``, ``compare --protocols NAME``).
        help: One line: the command's help and the heading of its section in a run's report.
        Settings: A dataclass of its own knobs; ``Settings()`` are the defaults (``EvalSettings.options[name]``).
        run: ``(inputs, options, settings) -> result``: ``inputs`` are ``{"train": (x, y), "test": (x, y)}`` features
            for a feature protocol, the :class:`~pwself.eval.source.FeatureSource` for one that reads its own data;
            ``options`` its ``Settings``; ``settings`` the shared :class:`~pwself.eval.protocols.EvalSettings`.
        table: ``({model: result}, note) -> Markdown lines`` (``note``: e.g. the pooling).
        scores: ``result -> {column: value}``: the numbers ``compare`` tabulates and plots.
        features: Whether it scores the bank/query features of a labelled dataset (else it reads its own data).
        flags: ``(parser, alone)``: adds its flags, on its own command (``alone``) or on ``pwself eval``.
        from_flags: ``(args, alone) -> Settings``; ``None`` from ``pwself eval``: not asked for (data not given).
        in_eval: Whether ``pwself eval`` offers it.
        description: Its command's ``--help`` text (default: the evaluation commands' shared one).
        check: ``(options, data)``: refuses, before any feature is extracted, settings the data cannot serve.
        model_input: ``options -> (channels, side)`` a timm model takes when no feature protocol runs.
        finish: ``(results, sources, options)``: rows beside the models' (e.g. floors), added to ``results``.

    Example:
        1-NN accuracy as a protocol of its own (no knob: its settings are a plain ``dict``), registered and run on
        features already extracted:

        >>> import torch, pwself
        >>> from pwself.eval.protocols import score_features
        >>> def one_nn(feats, options, settings):
        ...     (xb, yb), (xq, yq) = feats["train"], feats["test"]
        ...     return {"top1": float(100 * (yb[(xq @ xb.T).argmax(1)] == yq).float().mean())}
        >>> pwself.register_protocol(pwself.Protocol("nn1", "1-NN accuracy", dict, one_nn,
        ...                                          table=lambda per_model, note: [], scores=lambda r: r))
        >>> feats = {"train": (torch.eye(3), torch.arange(3)), "test": (torch.eye(3), torch.tensor([0, 1, 0]))}
        >>> round(score_features(feats, ["nn1"], pwself.EvalSettings())["nn1"]["top1"], 2)
        66.67
        >>> _ = pwself.PROTOCOLS.pop("nn1")
    """

    name: str
    help: str
    Settings: type
    run: Callable[[Any, Any, Any], Any]
    table: Callable[[dict[str, Any], str], list[str]]
    scores: Callable[[Any], dict[str, float]]
    features: bool = True
    flags: Callable[[argparse.ArgumentParser, bool], None] = no_flags
    from_flags: Callable[[argparse.Namespace, bool], Any] | None = None
    in_eval: bool = True
    description: str | None = None
    check: Callable[[Any, Any], None] | None = None
    model_input: Callable[[Any], tuple[int, int]] | None = None
    finish: Callable[[dict[str, Any], list[Any], Any], None] | None = None

    def settings(self, args: argparse.Namespace, alone: bool) -> Any:
        """Its settings from parsed flags (``None``: ``pwself eval`` was not asked for it)."""
        if self.from_flags is not None:
            return self.from_flags(args, alone)
        return settings_from_flags(self.Settings, args)
