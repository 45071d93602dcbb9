"""What a run folder holds, for ``pretrain --auto-resume``: nothing yet, a run to continue, or a finished
run whose stored result is shown instead of training again.

A run is finished when ``finished.json`` exists: training writes it last, after the exported backbone and
the final kNN, so a run cut off anywhere before that is continued from its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pwself.config import (
    ConfigError,
    TrainConfig,
    config_diff,
    config_to_dict,
    read_yaml,
    run_config,
)
from pwself.run.checkpoint import saved_config
from pwself.run.folder import RunDirError, RunFolder, holds_run, holds_weights, write_atomic

__all__ = ["RunState", "RunPlan", "inspect_run", "plan_run", "write_finished", "read_finished", "read_run_config"]


@dataclass(frozen=True)
class RunState:
    """``kind``: ``new`` (no run, or one that wrote no checkpoint yet: nothing to lose), ``interrupted`` (a
    checkpoint to continue from) or ``finished`` (``result`` holds what :func:`read_finished` returns)."""

    kind: str
    result: dict[str, Any] | None = None


def write_finished(run_dir: Path, step: int, knn: dict[int, dict[str, float]] | None,
                   floors: dict[str, Any] | None, about: dict[str, Any] | None = None) -> None:
    """Mark the run finished, with its final kNN and floors (``None`` when not evaluated) and ``about`` the run
    (version, date, device, images, training seconds: what the report shows)."""
    write_atomic(RunFolder(run_dir).finished, json.dumps({"step": step, "knn": knn, "floors": floors, **(about or {})},
                                                     indent=2))


def read_finished(run_dir: Path) -> dict[str, Any]:
    """The stored result of a finished run; kNN keys back to ints."""
    path = RunFolder(run_dir).finished
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({e}): delete it to finish the run again") from None
    if result.get("knn"):
        result["knn"] = {int(k): v for k, v in result["knn"].items()}
    return result


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder saved, read as its run meant it (:func:`pwself.run.checkpoint.saved_config`): the
    one reader of a run's config. A file that is not a run's config is one line naming it."""
    path = RunFolder(run_dir).config
    try:
        return saved_config(read_yaml(path, "run config") or {})
    except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError, AttributeError) as e:
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                          f"restore the run's {RunFolder.CONFIG}") from None


def inspect_run(cfg: TrainConfig, run_dir: Path, start_over: str) -> RunState:
    """The state of ``run_dir`` for a run of ``cfg``. A run of another config is refused in one line that
    names the keys that differ, then ``start_over``: what to do about it in the caller's context."""
    if not holds_run(run_dir) or not holds_weights(run_dir):
        return RunState("new")
    saved = config_to_dict(read_run_config(run_dir))
    now = config_to_dict(run_config(cfg))
    if not now["data"]["mean"]:  # measured at the start of a run: compare what the user set
        now["data"]["mean"], now["data"]["std"] = saved["data"]["mean"], saved["data"]["std"]
    diff = config_diff(saved, now)
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunDirError(f"{run_dir} holds a run of another config (it differs in {shown}): {start_over}")
    if RunFolder(run_dir).finished.exists():
        return RunState("finished", read_finished(run_dir))
    return RunState("interrupted")


@dataclass(frozen=True)
class RunPlan:
    """What ``pwself pretrain`` does in a run folder: train ``cfg`` (continuing a checkpoint when ``resume``), or
    show the stored result of a finished run of the same config (``finished``)."""

    cfg: TrainConfig
    run_dir: Path
    resume: bool
    finished: dict[str, Any] | None = None


def plan_run(cfg: TrainConfig, overrides: list[str], config_given: bool, resume: bool, auto_resume: bool,
             start_over: str) -> RunPlan:
    """The resume policy. Continuing a run (``resume`` or ``auto_resume``) without a config file reads the one the
    run saved, with only ``overrides`` changed; ``auto_resume`` then starts a new run, continues an interrupted one
    exactly or returns a finished one's result, and refuses a folder holding another config (``start_over``: what
    to do about it)."""
    from pwself.config import apply_overrides
    from pwself.data import expand_path

    run_dir = expand_path(cfg.out_dir)
    if (resume or auto_resume) and not config_given and RunFolder(run_dir).config.is_file():
        cfg = apply_overrides(read_run_config(run_dir), overrides)  # the run as it was
    cfg.validate()
    if not auto_resume:
        return RunPlan(cfg, run_dir, resume)
    state = inspect_run(cfg, run_dir, start_over)
    return RunPlan(cfg, run_dir, state.kind == "interrupted", state.result if state.kind == "finished" else None)
