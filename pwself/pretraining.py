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
from pwself.eval.floors import pixel_floor, random_init_floor, start_floor
from pwself.eval.knn import KnnSettings
from pwself.eval.protocols import EvalData, EvalSettings, evaluate, run_source
from pwself.run.folder import RunFolder
from pwself.run.state import read_run_config

__all__ = ["pretrain", "standard_evaluation", "run_experiment", "open_teacher"]


def _knn(backbone: nn.Module, cfg: TrainConfig, progress: bool) -> dict[int, dict[str, float]]:
    """k = 10, 20 on the run's test split, the train split as the bank (no cache: the weights change)."""
    settings = EvalSettings(cache_dir=None, progress=progress, options={"knn": KnnSettings(ks=(10, 20))})
    return evaluate(run_source(backbone, cfg), EvalData.of_run(cfg), ["knn"], settings)["knn"]


def _dense(backbone: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """The dense probe and Hummingbird retrieval of the teacher on ``cfg.dense_data`` (no cache: the weights
    change)."""
    from pwself.eval.dense import DenseSettings
    from pwself.eval.floors import DENSE_FLOORS

    dense = DenseSettings(cache_dir=None, progress=False, protocols=DENSE_FLOORS, root=cfg.dense_data)
    settings = EvalSettings(cache_dir=None, progress=False, options={"dense": dense})
    return evaluate(run_source(backbone, cfg), None, ["dense"], settings)["dense"]


def _floors(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """kNN of the same protocol on the seed's own random init and on raw pixels, and on the starting model of a
    run with ``backbone.init`` (with its dense probe when the run has ``dense_data``), cached in the run folder."""
    run = RunFolder(run_dir)
    floors = {"random_init": random_init_floor(cfg, run.floor("random_init"), linear=False),
              "pixels": pixel_floor(cfg, run.floor("pixels"))}
    if cfg.backbone.init:
        floors["start"] = start_floor(cfg, run.floor("start"), cfg.dense_data or None)
    return floors


def standard_evaluation() -> training.Evaluation:
    """The kNN and floors every pwself command evaluates a pretraining run with."""
    return training.Evaluation(knn=_knn, floors=_floors, dense=_dense)


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
             ) -> training.TrainResult:
    """:func:`pwself.train.train` with :func:`standard_evaluation` (same arguments)."""
    return training.train(cfg, resume, progress, overwrite, evaluation=standard_evaluation())


def run_experiment(cfg: TrainConfig, progress: bool) -> TrainConfig:
    """One run of an experiment (a ``compare`` run, a ``tune`` trial): trained, continued when interrupted,
    reused when finished with the same config. A folder holding a run of other settings is refused naming the
    keys, never shown as new. Returns the run's config as saved (with its measured statistics)."""
    from pwself.run.state import inspect_run

    run_dir = Path(cfg.out_dir)
    state = inspect_run(cfg, run_dir, f"use another --out-dir for these settings, or remove {run_dir} to train it "
                        "again")
    if state.kind != "finished":  # a half-started run without a checkpoint is moved aside and started again
        pretrain(cfg, resume=state.kind == "interrupted", progress=progress, overwrite=True)
    return read_run_config(run_dir)


def open_teacher(run_dir: Path, device: str) -> Any:
    """The run's teacher backbone as a feature source, on ``device`` (``auto``: a GPU when there is one)."""
    from pwself.eval.source import open_source
    from pwself.runtime import resolve_device

    src = open_source(str(run_dir))
    src.backbone.to(resolve_device(device))
    return src
