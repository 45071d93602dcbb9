"""Metric sinks of a run: ``metrics.jsonl`` (always; the source of truth), TensorBoard and Weights & Biases
(optional, chosen in the config's ``log`` section), all fed the same rows."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwself.run.folder import RunFolder
from pwself.sections import ConfigError

__all__ = ["MetricLoggers", "LogConfig", "json_row", "check_loggers"]


@dataclass
class LogConfig:
    """Where the metrics go besides ``metrics.jsonl`` (always written: the source of truth).

    Attributes:
        tensorboard: Also write TensorBoard event files to ``OUT_DIR/tensorboard`` (extra ``[tensorboard]``).
        wandb: Weights & Biases project to log to, empty for none (extra ``[wandb]``; ``WANDB_MODE=offline``
            is honoured).
    """

    tensorboard: bool = False
    wandb: str = ""


def json_row(row: dict[str, Any]) -> str:
    """One JSON line, non-finite numbers written as ``null`` (``NaN`` is not JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean)


def check_loggers(log: LogConfig) -> None:
    """Fail before training when a chosen logger's package is missing: one line naming the extra."""
    if log.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("log.tensorboard=true needs TensorBoard: pip install 'pwself[tensorboard]' "
                              "(or set log.tensorboard=false)") from None
    if log.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"log.wandb={log.wandb} needs Weights & Biases: pip install 'pwself[wandb]' "
                              "(or set log.wandb='')") from None


class MetricLoggers:
    """Append rows to ``metrics.jsonl`` and send their numbers to the configured loggers.

    Args:
        log: The ``log`` section of the run config.
        run_dir: The run directory (TensorBoard events go to ``run_dir/tensorboard``).
        config: The run config as a dict (recorded by W&B).
    """

    def __init__(self, log: LogConfig, run_dir: Path, config: dict[str, Any]) -> None:
        check_loggers(log)
        self.run_dir, self.folder = run_dir, RunFolder(run_dir)
        self.tensorboard = self.wandb = None
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.folder.tensorboard))
        if log.wandb:
            import wandb

            # One W&B run per pwself run, resumed with it (WANDB_MODE=offline is read by wandb itself).
            id_file = self.folder.wandb_id
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=log.wandb, dir=str(run_dir), config=config, id=run_id, resume="allow",
                                    name=run_dir.name)

    def _scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        numbers = {f"{prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for tag, value in numbers.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def write(self, row: dict[str, Any]) -> None:
        """Append a training row (``step`` and the scalars of the step)."""
        _append(self.folder.metrics, json_row(row) + "\n")
        self._scalars("train", {k: v for k, v in row.items() if k != "step"}, int(row["step"]))

    def knn(self, step: int, result: dict[int, dict[str, float]], epoch: float | None = None,
            train_time: tuple[float, float] = (0.0, 0.0)) -> None:
        """A kNN evaluation: to ``knn_history.jsonl`` during training (with the training seconds so far),
        and as ``knn/top1_kK`` scalars. ``train_time``: the (wall, CPU) seconds of training so far."""
        if epoch is not None:
            row = {"step": step, "epoch": round(epoch, 4), "train_s": round(train_time[0], 2),
                   "cpu_s": round(train_time[1], 2), "knn": result}
            _append(self.folder.knn_history, json_row(row) + "\n")
        self._scalars("knn", {f"top1_k{k}": r["top1"] for k, r in result.items()}, step)

    def dense(self, step: int, result: dict[str, Any], epoch: float, train_time: tuple[float, float]) -> None:
        """A dense probe during training: to ``dense_history.jsonl`` with the training seconds so far, and as
        ``dense/miou`` (and ``dense/hbird_miou``) scalars."""
        row = {"step": step, "epoch": round(epoch, 4), "train_s": round(train_time[0], 2),
               "cpu_s": round(train_time[1], 2), "miou": result["miou"], "lr": result["best"]["lr"],
               "at_grid_edge": result["best"]["at_grid_edge"]}
        if "hbird" in result:
            row["hbird_miou"] = result["hbird"]["miou"]
        _append(self.folder.dense_history, json_row(row) + "\n")
        self._scalars("dense", {k: row[k] for k in ("miou", "hbird_miou") if k in row}, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _append(path: Path, text: str) -> None:
    """Append a line; an error (a full disk) names the file, which a bare write's error does not."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
