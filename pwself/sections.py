"""What every config section uses to check and describe itself: the error type, the checks, each field's help.

Each section (``data``, ``views``, ``backbone``, ``loss``, an objective's options, ...) is a dataclass in the
module that uses it, with a ``validate`` method built from these helpers; :mod:`pwself.config` only assembles
the sections. The messages name the dotted key, the value and what is allowed, in one line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["ConfigError", "POSITIVE", "NON_NEGATIVE", "FRACTION", "check_ranges", "check_choice", "check_interval",
           "field_help"]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the fix."""


Range = tuple[Callable[[Any], bool], str]
POSITIVE: Range = (lambda x: x > 0, "> 0")
NON_NEGATIVE: Range = (lambda x: x >= 0, ">= 0")
FRACTION: Range = (lambda x: 0 <= x <= 1, "in [0, 1]")


def check_ranges(section: Any, prefix: str, ranges: Mapping[str, Range]) -> None:
    """Refuse a field of ``section`` outside its range (and any non-finite float), named ``prefix.field``
    (``field`` for an empty prefix)."""
    for name, (ok, allowed) in ranges.items():
        value = getattr(section, name)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")


def check_choice(key: str, value: str, allowed: Iterable[str]) -> None:
    """Refuse a value outside its registry, naming the choices (which the owning module lists)."""
    allowed = list(allowed)
    if value not in allowed:
        choices = f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise ConfigError(f"{key}={value!r}: use {choices}")


def check_interval(key: str, pair: tuple[float, float], upper: float | None = None) -> None:
    """Refuse ``[low, high]`` unless ``0 < low <= high`` (``<= upper`` when given)."""
    lo, hi = pair
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ConfigError(f"{key}={[lo, hi]} must be [low, high] with 0 < low <= high{bound}")


def field_help(cls: type) -> dict[str, str]:
    """One line of help for every field of a config section, from the field's metadata
    (``field(metadata={"help": ...})``). A field that gives none takes the first sentence of its entry in the
    class docstring's ``Attributes:`` (the text is written once, where the API documentation reads it too),
    stored into its metadata on first use."""
    fields = dataclasses.fields(cls)
    missing = [f for f in fields if "help" not in f.metadata]
    if missing:
        docs = _attribute_docs(cls.__doc__ or "")
        for f in missing:
            f.metadata = types.MappingProxyType({**f.metadata, "help": docs.get(f.name, "")})
    return {f.name: f.metadata["help"] for f in fields}


def _attribute_docs(doc: str) -> dict[str, str]:
    """The first sentence of each entry of a Google-style ``Attributes:`` block (backquotes made single)."""
    docs: dict[str, str] = {}
    inside, name, first_indent = False, None, 0
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside or not stripped:
            continue
        head, sep, rest = stripped.partition(": ")
        indent = len(line) - len(line.lstrip())
        if sep and head.isidentifier() and (name is None or indent <= first_indent):
            name, first_indent = head, indent
            docs[name] = rest
        elif name is not None:
            docs[name] += " " + stripped
    return {k: re.split(r"(?<=\.)\s+(?=[A-Z0-9])", v.replace("``", "`"))[0] for k, v in docs.items()}
