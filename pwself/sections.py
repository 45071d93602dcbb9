"""What every config section uses to check itself: the error type and two checks.

Each section (``data``, ``views``, ``backbone``, ``loss``, an objective's options, ...) is a dataclass in the
module that uses it, with a ``validate`` method built from these helpers; :mod:`pwself.config` only assembles
the sections. The messages name the dotted key, the value and what is allowed, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["ConfigError", "POSITIVE", "NON_NEGATIVE", "FRACTION", "check_ranges", "check_choice", "check_interval"]


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
