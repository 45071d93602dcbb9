"""A pretraining run as pwself's commands run it (one run of an experiment): :func:`pwself.train.train`, which
only trains, with the standard evaluation as callbacks (the teacher's kNN, pooled as the objective says, at the
end and with ``eval.knn_every_epochs``; its floors: random init, raw pixels, the starting model; the dense probe
with ``eval.dense_every_epochs``), and :func:`run_experiment`, which reuses a finished run and continues an
interrupted one. What ``pwself pretrain``, ``compare``, ``tune`` and :func:`pwself.pretrain` run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

import pwself.train as training
from pwself.config import TrainConfig
from pwself.data import DATA_KINDS, open_dataset
from pwself.eval.floors import comparison_settings, pixel_floor, random_init_floor, start_floor
from pwself.eval.knn import KnnSettings
from pwself.eval.protocols import EvalData, EvalSettings, evaluate, run_source
from pwself.run.folder import RunFolder
from pwself.run.state import read_run_config

__all__ = ["pretrain", "standard_evaluation", "run_experiment", "open_teacher", "KnnEvaluation", "DenseEvaluation",
           "knn_scores", "standard_floors"]

log = logging.getLogger(__name__)


def knn_scores(backbone: nn.Module, cfg: TrainConfig, progress: bool) -> dict[int, dict[str, float]]:
    """k = 10, 20 on the run's test split, the train split as the bank (no cache: the weights change)."""
    settings = EvalSettings(cache_dir=None, progress=progress, options={"knn": KnnSettings(ks=(10, 20))})
    return evaluate(run_source(backbone, cfg), EvalData.of_run(cfg), ["knn"], settings)["knn"]


def standard_floors(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """kNN of the same protocol on the seed's own random init and on raw pixels, and on the starting model of a
    run with ``backbone.init`` (with its dense probe when the run has ``eval.dense_data``), cached in the run
    folder."""
    run = RunFolder(run_dir)
    floors = {"random_init": random_init_floor(cfg, run.floor("random_init"), linear=False),
              "pixels": pixel_floor(cfg, run.floor("pixels"))}
    if cfg.backbone.init:
        floors["start"] = start_floor(cfg, run.floor("start"), cfg.eval.dense_data or None)
    return floors


class KnnEvaluation:
    """kNN of the teacher (``eval.knn_every_epochs`` during training, ``eval.knn_at_end``) and, beside the final
    one, its floors (``eval.knn_floors``); nothing without a labelled held-out split, said once at the start."""

    def start(self, cfg: TrainConfig, at: training.Moment) -> None:
        if not cfg.eval.knn:
            return
        if not at.heldout:
            if at.is_main:
                log.info("no labelled held-out split (%s): kNN is skipped; checkpoints, export and report are written",
                         f"no {cfg.data.root}/val or /test folder" if at.labelled else "unlabelled images")
        elif not DATA_KINDS[cfg.data.kind].in_memory:
            # Decode-check the evaluation split now (scanned and cached): a broken file there is named before
            # step 1, not at the end of training.
            open_dataset(cfg.data, "test", cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)

    def every(self, cfg: TrainConfig, at: training.Moment) -> float:
        return cfg.eval.knn_every_epochs if at.heldout else 0

    def point(self, backbone: nn.Module, cfg: TrainConfig, at: training.Moment) -> None:
        res = knn_scores(backbone, cfg, False)
        if at.loggers is not None:
            at.loggers.knn(at.step, res, at.epoch, (at.train_s, at.cpu_s))

    def final(self, backbone: nn.Module, cfg: TrainConfig, at: training.Moment, progress: bool) -> dict[str, Any]:
        if not (cfg.eval.knn_at_end and at.heldout):
            return {}
        knn = knn_scores(backbone, cfg, progress and at.is_main)
        if at.is_main:
            at.folder.write_json(RunFolder.KNN, {"step": at.step, "train_s": round(at.train_s, 2),
                                                 "cpu_s": round(at.cpu_s, 2), "knn": knn})
            at.loggers.knn(at.step, knn)
        if not cfg.eval.knn_floors:
            return {"knn": knn}
        floors = standard_floors(cfg, at.folder.path)
        if at.is_main:
            at.folder.write_json(RunFolder.FLOORS, floors)
        return {"knn": knn, "floors": floors}


class DenseEvaluation:
    """The dense probe and Hummingbird retrieval of the teacher on ``eval.dense_data``, every
    ``eval.dense_every_epochs`` and at the end (``dense_history.jsonl``; no cache: the weights change)."""

    def start(self, cfg: TrainConfig, at: training.Moment) -> None:
        pass

    def every(self, cfg: TrainConfig, at: training.Moment) -> float:
        return cfg.eval.dense_every_epochs

    def point(self, backbone: nn.Module, cfg: TrainConfig, at: training.Moment) -> None:
        settings = comparison_settings(cfg.eval.dense_data)  # no cache: the weights change
        res = evaluate(run_source(backbone, cfg), None, ["dense"], settings)["dense"]
        if at.loggers is not None:
            at.loggers.dense(at.step, res, at.epoch, (at.train_s, at.cpu_s))

    def final(self, backbone: nn.Module, cfg: TrainConfig, at: training.Moment, progress: bool) -> dict[str, Any]:
        if cfg.eval.dense_every_epochs:  # the curve's last point
            self.point(backbone, cfg, at)
        return {}


def standard_evaluation() -> list[training.EvalCallback]:
    """What every pwself command evaluates a pretraining run with: the dense probe, then kNN and its floors."""
    return [DenseEvaluation(), KnnEvaluation()]


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
