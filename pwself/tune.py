"""Equal-budget tuning of an objective's own knobs, chosen on held-out training data, never on test.

``run_tuning`` trains ``trials`` settings drawn (seeded) from a grid of choices, each for the base config's
budget, into ``OUT/trial_<i>/``, and scores each (:class:`TrialScore`) by weighted kNN (k = 10, T = 0.07) of
its teacher features with a seeded share of the *train* split as queries and the rest of train as the bank,
or, for dense features, by the dense probe's mIoU on held-out images of a dense dataset's *train* split. The
test split is never opened: runs have ``eval.knn_at_end=false`` and ``eval.knn_floors=false``. Giving every method the
same ``trials`` and budget is what makes a comparison of tuned methods fair.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pwself.config import ConfigError, TrainConfig, apply_overrides, config_to_dict, split_choices
from pwself.objectives import objective_overrides

__all__ = ["TuneSpace", "TrialScore", "SelectionMetric", "SELECTION_METRICS", "parse_space", "sample_trials",
           "heldout_knn", "heldout_miou", "run_trial", "run_tuning", "tune_markdown"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TuneSpace:
    """What is searched: ``choices`` per key (two or more values) and ``fixed`` overrides for every trial."""

    choices: dict[str, list[str]]
    fixed: list[str]


@dataclass(frozen=True)
class SelectionMetric:
    """One way to score a tuning trial, on training data only (``--select NAME``).

    Attributes:
        name: Its ``--select`` name.
        key: The score's name in ``tune.json`` rows.
        title: Its column heading.
        dense: Whether it reads held-out images of a dense dataset's train split (``--dense``), else a held-out
            share of the run's own train split (``--val-fraction``).
        score: ``(teacher backbone, the run's config, TrialScore) -> %``.
    """

    name: str
    key: str
    title: str
    dense: bool
    score: Callable[[torch.nn.Module, TrainConfig, TrialScore], float]


SELECTION_METRICS = {m.name: m for m in (
    SelectionMetric("knn", "heldout_knn10", "held-out kNN", False,
                    lambda backbone, cfg, s: heldout_knn(backbone, cfg, s.val_fraction)),
    SelectionMetric("miou", "heldout_miou", "held-out dense mIoU", True,
                    lambda backbone, cfg, s: heldout_miou(backbone, cfg, str(s.dense_root), s.dense_heldout, "linear")),
    SelectionMetric("hbird", "heldout_hbird_miou", "held-out Hummingbird mIoU", True,
                    lambda backbone, cfg, s: heldout_miou(backbone, cfg, str(s.dense_root), s.dense_heldout, "hbird")),
)}
"""Every ``--select`` metric: kNN, the dense linear probe's mIoU, Hummingbird's mIoU (no probe to train)."""


@dataclass(frozen=True)
class TrialScore:
    """What a trial is scored by, read from training data only.

    Attributes:
        metric: ``knn`` (kNN top-1 on a held-out share of the run's train split), ``miou`` (the dense linear
            probe's mean IoU on held-out images of a dense dataset's train split: tuning for dense features) or
            ``hbird`` (Hummingbird retrieval's mean IoU on the same images: no probe to train, the cheap one).
        val_fraction: kNN's held-out share.
        dense_root: The dense dataset of ``miou`` (``pwself make-scenes`` layout).
        dense_heldout: Images of its train split held out for the score (the probe learns from others).
    """

    metric: str = "knn"
    val_fraction: float = 0.1
    dense_root: str | None = None
    dense_heldout: int = 500

    @property
    def of(self) -> SelectionMetric:
        return SELECTION_METRICS[self.metric]

    def validate(self) -> None:
        if self.metric not in SELECTION_METRICS:
            raise ValueError(f"--select {self.metric}: use knn (held-out kNN), miou (held-out dense mIoU of the "
                             "linear probe) or hbird (held-out Hummingbird mIoU, no training)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction {self.val_fraction}: use a share in (0, 1), e.g. 0.1")
        if self.of.dense and not self.dense_root:
            raise ValueError(f"--select {self.metric} scores dense features: pass --dense DIR (made by pwself "
                             "make-scenes, or your own masks)")
        if not self.of.dense and self.dense_root:
            raise ValueError(f"--dense {self.dense_root} is read by --select miou or hbird only: add --select miou to "
                             "score trials by held-out dense mIoU, or drop --dense")
        if self.dense_heldout < 1:
            raise ValueError(f"--dense-heldout {self.dense_heldout}: hold out 1 or more images, e.g. 500")

    @property
    def key(self) -> str:
        """The score's name in ``tune.json`` rows."""
        return self.of.key

    @property
    def heldout(self) -> dict[str, Any]:
        """What identifies the held-out data the score was read on (kept beside each cached score)."""
        if self.of.dense:
            return {"dense_root": str(self.dense_root), "dense_heldout": self.dense_heldout}
        return {"val_fraction": self.val_fraction}

    @property
    def title(self) -> str:
        return self.of.title


def parse_space(items: list[str]) -> TuneSpace:
    """``KEY=V1,V2,...`` items are searched; ``KEY=V`` (one value, ``[a,b]`` lists included) are fixed."""
    choices: dict[str, list[str]] = {}
    fixed = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"{item!r} is not KEY=VALUE or KEY=CHOICE1,CHOICE2 (e.g. optim.lr=1e-3,3e-3)")
        values = split_choices(value)
        if len(values) > 1:
            choices[key] = values
        else:
            fixed.append(item)
    if not choices:
        raise ValueError("nothing to tune: give at least one KEY=CHOICE1,CHOICE2 "
                         "(e.g. objectives.logo.weight=0.1,0.5,1)")
    return TuneSpace(choices, fixed)


def sample_trials(space: TuneSpace, trials: int, seed: int = 0) -> list[dict[str, str]]:
    """``trials`` distinct settings of the grid (all of it when it is smaller), in a seeded random order."""
    keys = list(space.choices)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(space.choices[k] for k in keys))]
    random.Random(seed).shuffle(grid)
    if trials > len(grid):
        log.info("%d trials asked, the grid has %d settings: trying all of them", trials, len(grid))
    return grid[:trials]


def heldout_knn(backbone: torch.nn.Module, cfg: TrainConfig, val_fraction: float = 0.1, k: int = 10) -> float:
    """kNN top-1 (%) on a seeded ``val_fraction`` of the train split, the rest of train as the bank; pooled
    as the objective says. Reads the train split only."""
    from pwself.eval.knn import KnnSettings
    from pwself.eval.protocols import EvalData, EvalSettings, evaluate, run_source

    settings = EvalSettings(cache_dir=None, progress=False, options={"knn": KnnSettings(ks=(k,))})
    try:
        res = evaluate(run_source(backbone, cfg), EvalData.heldout(cfg, val_fraction), ["knn"], settings)["knn"]
    except ValueError as e:
        if "needs labels" not in str(e):
            raise
        raise ValueError("tuning scores kNN on held-out train labels: the training images are unlabelled; give "
                         "it a labelled dataset (folder sub-folders, idx, cifar)") from None
    return next(iter(res.values()))["top1"]


def heldout_miou(backbone: torch.nn.Module, cfg: TrainConfig, dense_root: str, heldout: int = 500,
                 protocol: str = "linear") -> float:
    """The mIoU (%) of a dense protocol (the linear probe, or ``hbird``) on ``heldout`` seeded images of
    ``dense_root``'s train split, the probe trained (or the memory built) on others of that split. Reads the
    train split only."""
    from pwself.eval.dense import DenseSettings
    from pwself.eval.protocols import EvalSettings, evaluate, run_source

    dense = DenseSettings(heldout=heldout, cache_dir=None, progress=False, protocols=(protocol,), root=dense_root)
    settings = EvalSettings(cache_dir=None, progress=False, options={"dense": dense})
    res = evaluate(run_source(backbone, cfg), None, ["dense"], settings)["dense"]
    return res["miou"] if protocol == "linear" else res[protocol]["miou"]


def trial_config(base: TrainConfig, objective: str, setting: dict[str, str], fixed: list[str], run_dir: Path
                 ) -> TrainConfig:
    """The validated config of one trial (a bad value fails here, before any trial trains)."""
    overrides = [*objective_overrides(objective), *fixed, *(f"{k}={v}" for k, v in setting.items()),
                 f"out_dir={run_dir}", "eval.knn_at_end=false", "eval.knn_floors=false", "eval.knn_every_epochs=0"]
    cfg = apply_overrides(base, overrides)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"trial {run_dir.name} {setting}: {e}") from None
    return cfg


def _trial(cfg: TrainConfig, setting: dict[str, str], select: TrialScore, progress: bool) -> float:
    """Train one trial (reused when finished with the same config; continued when interrupted) and score it
    once per metric and held-out set (``tune_score.json``, ``tune_score_miou.json``, ``tune_score_hbird.json``)."""
    from pwself.experiment import open_teacher, run_experiment
    from pwself.run.folder import RunFolder, write_atomic

    run_dir, saved = Path(cfg.out_dir), run_experiment(cfg, progress)
    held = select.heldout
    path = RunFolder(run_dir).tune_score(select.metric)
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("heldout") == held and select.key in cached:
        return cached[select.key]
    backbone = open_teacher(run_dir, cfg.device).backbone
    score = select.of.score(backbone, saved, select)
    write_atomic(path, json.dumps({"setting": setting, select.key: score, "heldout": held}, indent=2))
    return score


def run_trial(base: TrainConfig, objective: str, space: TuneSpace, trials: int, index: int, out_dir: str | Path,
              select: TrialScore = TrialScore(), seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train and score trial ``index`` of :func:`run_tuning`'s draw alone (a parallel worker's share); a later
    :func:`run_tuning` over the same ``out_dir`` reads its score instead of training it again."""
    select.validate()
    settings = sample_trials(space, trials, seed)
    if not 0 <= index < len(settings):
        raise ValueError(f"--trial {index}: this grid and --trials give trials 0..{len(settings) - 1}")
    out = Path(out_dir)
    cfgs = [trial_config(base, objective, st, space.fixed, out / f"trial_{i}") for i, st in enumerate(settings)]
    return {"setting": settings[index], select.key: _trial(cfgs[index], settings[index], select, progress)}


def run_tuning(base: TrainConfig, objective: str, space: TuneSpace, trials: int, out_dir: str | Path,
               select: TrialScore = TrialScore(), seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train and score ``trials`` settings of ``objective``; writes ``OUT/tune.json`` and ``OUT/tune.md``.

    Trials scored before (e.g. by :func:`run_trial` workers) are read, not trained again.

    Returns ``{"objective", "select", "trials": [{"setting", <score>}], "best": {...}, "compare_label"}``, the
    score named by ``select.key``; ``compare_label`` is the ``pwself compare --objectives`` entry that runs
    the chosen setting.
    """
    select.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, settings = [], sample_trials(space, trials, seed)
    cfgs = [trial_config(base, objective, st, space.fixed, out_dir / f"trial_{i}") for i, st in enumerate(settings)]
    for i, (setting, cfg) in enumerate(zip(settings, cfgs)):
        score = _trial(cfg, setting, select, progress)
        rows.append({"setting": setting, select.key: score})
        log.info("trial %d/%d %s: %s %.2f", i + 1, trials, setting, select.title, score)
    best = rows[0]
    for row in rows[1:]:  # strict >: the earlier trial wins a tie
        if row[select.key] > best[select.key]:
            best = row
    chosen = [*space.fixed, *(f"{k}={v}" for k, v in best["setting"].items())]
    result = {"objective": objective, "select": select.metric, "score_key": select.key, "trials": rows,
              "best": best, "val_fraction": select.val_fraction, **select.heldout,
              "budget": {"epochs": base.epochs, "batch_size": base.batch_size, "data": config_to_dict(base)["data"]},
              "config": config_to_dict(base),
              "compare_label": objective + (":" + "+".join(chosen) if chosen else "")}
    (out_dir / "tune.json").write_text(json.dumps(result, indent=2))
    (out_dir / "tune.md").write_text(tune_markdown(result))
    return result


def tune_markdown(result: dict[str, Any]) -> str:
    """The trials as a table, best first, and the chosen setting."""
    metric = SELECTION_METRICS[result.get("select", "knn")]
    key, title = metric.key, metric.title
    keys = list(result["trials"][0]["setting"]) if result["trials"] else []
    if metric.dense:
        head = (f"Tuning {result['objective']}: {title} (%) on {result['dense_heldout']} held-out train images of "
                f"{result['dense_root']}")
    else:
        head = f"Tuning {result['objective']}: held-out kNN k=10 (top-1 %) on {result['val_fraction']:.0%} of train"
    lines = [head, "", "| " + " | ".join(keys) + f" | {title} |", "|" + "---|" * (len(keys) + 1)]
    for row in sorted(result["trials"], key=lambda r: -r[key]):
        lines.append("| " + " | ".join(row["setting"][k] for k in keys) + f" | {row[key]:.2f} |")
    lines += ["", f"chosen: `{result['compare_label']}`"]
    return "\n".join(lines) + "\n"
