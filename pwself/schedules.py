"""DINO's per-step schedules: arrays indexed by the global step (dinov2's habit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pwself.config import TrainConfig

__all__ = ["cosine_schedule", "Schedules", "make_schedules", "apply_schedules", "total_steps", "schedule_problems",
           "log_interval"]


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> list[float]:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``.

    Example:
        >>> import pwself
        >>> [round(v, 3) for v in pwself.cosine_schedule(1.0, 0.0, 6, warmup=2)]
        [0.0, 0.5, 1.0, 0.854, 0.5, 0.146]
    """
    out = [warmup_start + (base - warmup_start) * i / warmup for i in range(min(warmup, total))]
    rest = total - len(out)
    out += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / max(rest, 1))) for i in range(rest)]
    return out


@dataclass(frozen=True)
class Schedules:
    """Per-step values: learning rate, weight decay, teacher momentum and temperature, last-layer switch and
    backbone switch (off during the head warm-up)."""

    lr: list[float]
    weight_decay: list[float]
    momentum: list[float]
    teacher_temp: list[float]
    last_layer_on: list[bool]
    backbone_on: list[bool] | None = None  # None: always on


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``steps`` when set, else ``epochs`` passes over the data."""
    return cfg.steps or cfg.epochs * steps_per_epoch


def peak_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """The lr the warm-up reaches: ``optim.lr`` is per 256 images and scales with the global batch (DINO's rule)."""
    return cfg.optim.lr * cfg.batch_size * world_size / 256


def batch_line(cfg: TrainConfig, world_size: int = 1) -> str:
    """The global batch and the lr it gives, as the run's log, config.yaml and report say them."""
    procs = f" ({cfg.batch_size} per process x {world_size})" if world_size > 1 else ""
    return (f"global batch {cfg.batch_size * world_size}{procs}, peak lr {peak_lr(cfg, world_size):.4g} "
            f"(optim.lr {cfg.optim.lr:.4g} x {cfg.batch_size * world_size} / 256)")


MIN_CURVE_POINTS = 20  # logged rows a run's curves get at least (log_every is lowered for short runs)
# Fewer optimizer steps than this change a from-scratch model too little to measure: the README's former
# small-folder run (10 steps) scored the random init's kNN to the hundredth (RESULTS.md, "Small folders").
MIN_LEARNING_STEPS = 100


def log_interval(cfg: TrainConfig, total: int) -> int:
    """``log_every``, lowered so that a short run still logs :data:`MIN_CURVE_POINTS` rows (every step at most)."""
    return max(1, min(cfg.log_every, total // MIN_CURVE_POINTS))


def schedule_problems(cfg: TrainConfig, steps_per_epoch: int) -> list[str]:
    """One line for each part of the schedule that the run is too short for, naming the setting that fixes it."""
    total, o, lc = total_steps(cfg, steps_per_epoch), cfg.optim, cfg.loss
    lines = []
    if total < MIN_LEARNING_STEPS and not cfg.backbone.init:
        lines.append(f"this run has {total} optimizer step(s) ({steps_per_epoch} a pass over the data at batch "
                     f"{cfg.batch_size}): too few to learn measurably from a random init; give --steps 300 or more "
                     f"(a small folder on a CPU: --config small_folder)")

    def fraction() -> str:  # epochs that make a tenth of the run
        return f"{max(0.01, round(total / 10 / steps_per_epoch, 2)):g}"

    parts = (("the lr warm-up", "optim.warmup_epochs", o.warmup_epochs),
             ("the teacher temperature warm-up", "loss.warmup_teacher_temp_epochs", lc.warmup_teacher_temp_epochs),
             ("the head warm-up", "optim.head_warmup_epochs", o.head_warmup_epochs),
             ("the frozen last layer", "optim.freeze_last_layer_epochs", o.freeze_last_layer_epochs))
    for what, key, epochs in parts:
        n = round(epochs * steps_per_epoch)
        if n and n >= total / 2:
            lines.append(f"{what} ({key}={epochs:g}: {n} steps) takes {'all' if n >= total else 'half or more'} of "
                         f"this {total}-step run: set {key}={fraction()}, or train longer (steps=N or more epochs)")
    if cfg.log_every > total // MIN_CURVE_POINTS:
        points = -(-total // cfg.log_every)  # the last step is always logged
        lines.append(f"log_every={cfg.log_every} would log {points} point(s) of this {total}-step run: "
                     f"logging every {log_interval(cfg, total)} step(s) instead")
    return lines


def make_schedules(cfg: TrainConfig, steps_per_epoch: int, world_size: int = 1) -> Schedules:
    """DINO's schedules for :func:`total_steps` steps (lr scaled by the global batch / 256)."""
    total = total_steps(cfg, steps_per_epoch)
    o, lc = cfg.optim, cfg.loss
    lr = cosine_schedule(peak_lr(cfg, world_size), o.min_lr, total, int(o.warmup_epochs * steps_per_epoch))
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    mom = cosine_schedule(o.momentum_teacher, 1.0, total)
    warm = int(lc.warmup_teacher_temp_epochs * steps_per_epoch)
    rise = lc.teacher_temp - lc.warmup_teacher_temp
    temp = [lc.warmup_teacher_temp + rise * min(i / warm, 1.0) if warm else lc.teacher_temp for i in range(total)]
    freeze = int(o.freeze_last_layer_epochs * steps_per_epoch)
    heads_only = round(o.head_warmup_epochs * steps_per_epoch)
    return Schedules(lr, wd, mom, temp, [i >= freeze for i in range(total)],
                     [i >= heads_only for i in range(total)] if heads_only else None)


def apply_schedules(opt: torch.optim.Optimizer, sch: Schedules, step: int) -> None:
    """Set lr and weight decay of every group for ``step``: the head's last layer has lr 0 while frozen, the
    backbone lr 0 during the head warm-up (exactly unchanged: AdamW's decay is scaled by lr), each group its
    layer-wise ``lr_scale``."""
    for g in opt.param_groups:
        frozen = (g["last_layer"] and not sch.last_layer_on[step]) or (
            g.get("backbone", False) and sch.backbone_on is not None and not sch.backbone_on[step])
        g["lr"] = 0.0 if frozen else sch.lr[step] * g.get("lr_scale", 1.0)
        g["weight_decay"] = sch.weight_decay[step] if g["decay"] else 0.0
