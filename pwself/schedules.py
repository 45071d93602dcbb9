"""DINO's per-step schedules: arrays indexed by the global step (dinov2's habit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pwself.config import TrainConfig

__all__ = ["cosine_schedule", "Schedules", "make_schedules", "apply_schedules"]


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


def make_schedules(cfg: TrainConfig, steps_per_epoch: int, world_size: int = 1) -> Schedules:
    """DINO's schedules for ``cfg.epochs * steps_per_epoch`` steps (lr scaled by the global batch / 256)."""
    total = cfg.epochs * steps_per_epoch
    o, lc = cfg.optim, cfg.loss
    peak = o.lr * cfg.batch_size * world_size / 256
    lr = cosine_schedule(peak, o.min_lr, total, int(o.warmup_epochs * steps_per_epoch))
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
