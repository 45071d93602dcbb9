"""Pretraining with the standard evaluation: the teacher's kNN (pooled as the objective says; at the end and,
with ``knn_every_epochs``, during training) and its floors (random init, raw pixels). What ``pwself
pretrain``, ``compare``, ``tune`` and :func:`pwself.pretrain` run; :func:`pwself.train.train` itself only
trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

import pwself.train as training
from pwself.config import TrainConfig
from pwself.eval import knn as knn_eval
from pwself.eval.floors import pixel_floor, random_init_floor

__all__ = ["pretrain", "standard_evaluation"]


def _knn(backbone: nn.Module, cfg: TrainConfig, progress: bool) -> dict[int, dict[str, float]]:
    return knn_eval.evaluate_knn_run(backbone, cfg, progress=progress)


def _floors(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """kNN of the same protocol on the seed's own random init and on raw pixels, cached in the run folder."""
    return {"random_init": random_init_floor(cfg, run_dir / "floor_random_init.json", linear=False),
            "pixels": pixel_floor(cfg, run_dir / "floor_pixels.json")}


def standard_evaluation() -> training.Evaluation:
    """The kNN and floors every pwself command evaluates a pretraining run with."""
    return training.Evaluation(knn=_knn, floors=_floors)


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
             ) -> training.TrainResult:
    """:func:`pwself.train.train` with :func:`standard_evaluation` (same arguments)."""
    return training.train(cfg, resume, progress, overwrite, evaluation=standard_evaluation())
