"""One training step, built once from a config and shared by training, benchmarks and scripts:
views -> photometric augmentation -> matching -> network -> objective -> backward -> EMA.

:func:`build_step` makes every part with the run's own settings (objective, temperatures, centers,
precision), so what a benchmark measures is exactly what trains.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pwself.augment import PhotometricAugment
from pwself.config import TrainConfig
from pwself.losses import gram_loss
from pwself.models import DistillNet, HeadOutput, ema_update, forward_tokens, portable_init
from pwself.objectives import Objective, build_objective, objective_class
from pwself.objectives.base import view_grids
from pwself.runtime import all_true
from pwself.views import MultiCrop, MultiCropViews

log = logging.getLogger(__name__)

__all__ = ["StepOutput", "GramAnchor", "distill_step", "ViewPipeline", "param_groups", "TrainStep", "make_objective",
           "build_step", "unwrap"]


@dataclass(frozen=True)
class StepOutput:
    """The loss terms of a step (``terms["loss"]`` carries the graph) and the teacher outputs (for centers
    and statistics)."""

    terms: dict[str, Tensor]
    teacher: HeadOutput


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class GramAnchor:
    """Gram anchoring (``loss.gram_weight``): a frozen copy of the starting backbone and the term's weight."""

    backbone: nn.Module
    weight: float

    def term(self, global_crops: Tensor, student_patches: Tensor) -> Tensor:
        """The Gram loss of the student's global-crop patch tokens against the anchor's on the same crops."""
        with torch.no_grad():
            anchor = forward_tokens(self.backbone, global_crops).patches
        return gram_loss(student_patches, anchor)


def distill_step(
    student: nn.Module, teacher: DistillNet, objective: Objective, views: MultiCropViews, teacher_temp: float,
    generator: torch.Generator | None = None, anchor: GramAnchor | None = None,
) -> StepOutput:
    """Forward the teacher and the student (a :class:`DistillNet`, possibly DDP-wrapped) on the views and
    compute the objective's loss, plus Gram anchoring when an ``anchor`` is given (any objective). Random draws
    (patch subsets) come from the CPU ``generator``."""
    with torch.no_grad():
        t_tokens = teacher.encode([views.global_crops])
    grids = view_grids(views, teacher.backbone.patch_embed.patch_size[0])
    select = objective.select(views, grids, t_tokens, generator)
    s_out = student([views.global_crops, views.local_crops], select, objective.recompute_head)
    with torch.no_grad():
        t_out = replace(objective.teacher_output(teacher, t_tokens, views, s_out.selection),
                        global_patches=t_tokens[0].patches)  # the diagnostics read the teacher's patch tokens
    terms = objective.loss(s_out, t_out, views, teacher_temp)
    if anchor is not None:
        gram = anchor.term(views.global_crops, s_out.global_patches)
        terms = {**terms, "gram": gram.detach(), "loss": terms["loss"] + anchor.weight * gram}
    return StepOutput(terms, t_out)


class ViewPipeline:
    """Multi-crop views of a batch, photometric augmentation and normalization, on the training device."""

    def __init__(self, cfg: TrainConfig, mean: list[float], std: list[float], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype
        self.multicrop = MultiCrop.from_config(cfg.views)
        self.augment = PhotometricAugment(cfg.photometric, cfg.backbone.patch_size)
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1)

    def __call__(self, batch: Tensor | MultiCropViews, generator: torch.Generator | None) -> MultiCropViews:
        """``[B, C, H, W]`` float images in [0, 1] (cut here, in one batched call), or views already cut from
        the originals with uint8 crops (:mod:`pwself.data.crops`) -> augmented, normalized views."""
        if isinstance(batch, MultiCropViews):
            def to_unit(x: Tensor) -> Tensor:
                return x.to(self.device, non_blocking=True).to(self.dtype) / 255

            views = MultiCropViews(to_unit(batch.global_crops), to_unit(batch.local_crops), batch.boxes, batch.flips,
                                   batch.n_global, batch.n_local)
        else:
            if not batch.is_floating_point():
                raise ValueError(f"the step takes float images in [0, 1], got {batch.dtype}: pass "
                                 "images.float() / 255")
            views = self.multicrop(batch.to(self.dtype), generator)
        return MultiCropViews(
            (self.augment(views.global_crops, generator) - self.mean) / self.std,
            (self.augment(views.local_crops, generator) - self.mean) / self.std,
            views.boxes, views.flips, views.n_global, views.n_local,
        )


def _layer_scale(name: str, depth: int, layer_decay: float) -> float:
    """The lr factor of a student parameter under layer-wise decay (dinov2's ``get_vit_lr_decay_rate``)."""
    if not name.startswith("backbone."):
        return 1.0  # heads, the mask token, the objective's own modules
    rest = name.removeprefix("backbone.")
    if rest.startswith("blocks."):
        layer = int(rest.split(".")[1]) + 1
    elif rest.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "rope")):
        layer = 0
    else:
        layer = depth + 1  # the final norm
    return layer_decay ** (depth + 1 - layer)


def param_groups(named: Iterator[tuple[str, nn.Parameter]], split_backbone: bool = False, layer_decay: float = 1.0,
                 depth: int = 0) -> list[dict[str, Any]]:
    """AdamW groups tagged ``decay`` and ``last_layer``: no decay on biases, norms and position/CLS/register tokens.
    With ``split_backbone`` (a head warm-up or layer-wise decay), the backbone's parameters are groups of their
    own tagged ``backbone`` with their ``lr_scale`` (groups are only split when asked: a run's optimizer state
    keeps its layout)."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token", "reg_token"))
        last = name.startswith(("head.last_layer", "patch_head.last_layer"))
        key: tuple = (decay, last)
        if split_backbone:
            key += (name.startswith("backbone."), _layer_scale(name, depth, layer_decay))
        groups.setdefault(key, []).append(p)
    out = []
    for key, ps in sorted(groups.items()):
        group = {"params": ps, "decay": key[0], "last_layer": key[1]}
        if split_backbone:
            group.update(backbone=key[2], lr_scale=key[3])
        out.append(group)
    return out


@dataclass
class TrainStep:
    """Everything one optimization step touches; :meth:`__call__` runs it."""

    student: nn.Module  # a DistillNet, DDP-wrapped under torchrun
    teacher: DistillNet
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    views: ViewPipeline
    clip_grad: float
    amp_dtype: torch.dtype | None
    anchor: GramAnchor | None = None

    @property
    def model(self) -> DistillNet:
        """The student network (unwrapped)."""
        return unwrap(self.student)

    def state_dict(self) -> dict[str, Any]:
        """The states a checkpoint keeps of the step: student, teacher, objective, optimizer, scaler (and the Gram
        anchor's backbone when there is one)."""
        return {"student": self.model.state_dict(), "teacher": self.teacher.state_dict(),
                "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                **({"anchor": self.anchor.backbone.state_dict()} if self.anchor is not None else {})}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (format 1 checkpoints kept an extra center: not strict)."""
        self.model.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.objective.load_state_dict(ckpt["objective"], strict=ckpt.get("format", 2) >= 2)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.anchor is not None:
            self.anchor.backbone.load_state_dict(ckpt["anchor"])

    def trainable(self) -> list[nn.Parameter]:
        """Student parameters, then the objective's own (the optimizer's order)."""
        return [*self.model.parameters(), *self.objective.parameters()]

    def forward(self, batch: Tensor | MultiCropViews, teacher_temp: float, generator: torch.Generator | None
                ) -> StepOutput:
        """Views, augmentation and the loss of a batch (float images in [0, 1], or views already cut)."""
        views = self.views(batch, generator)
        device = views.global_crops.device
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return distill_step(self.student, self.teacher, self.objective, views, teacher_temp, generator,
                                self.anchor)

    def update(self, out: StepOutput, momentum: float) -> float:
        """Backward, clip, optimizer step, EMA teacher and centers; the gradient norm (NaN when not clipped)."""
        grad_norm = float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.terms["loss"]).backward()  # DDP averages gradients over ranks here
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable(), self.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.model, momentum)
        self.objective.update_centers(out.teacher)
        return grad_norm

    def __call__(self, batch: Tensor | MultiCropViews, teacher_temp: float, momentum: float,
                 generator: torch.Generator | None) -> tuple[StepOutput, float | None]:
        """One step; ``(output, grad norm)``, the norm ``None`` when a non-finite loss on any rank skipped
        the update (no backward, no EMA, no centers)."""
        out = self.forward(batch, teacher_temp, generator)
        if not all_true(bool(torch.isfinite(out.terms["loss"])), self.views.device):  # every rank: one branch
            return out, None
        return out, self.update(out, momentum)


def make_objective(cfg: TrainConfig) -> Objective:
    """The run's objective, sized to its head (and patch head)."""
    return build_objective(cfg.loss, cfg.head.out_dim, cfg.backbone.embed_dim, cfg.head.patch_out_dim or None,
                           cfg.objectives)


def build_step(cfg: TrainConfig, device: torch.device, mean: list[float], std: list[float],
               distributed: bool = False, load_init: bool = True) -> TrainStep:
    """The step of a run: the seeded student network (started from ``backbone.init`` when set and
    ``load_init``), its EMA teacher (eval mode: deterministic, no drop path), the objective, AdamW and the
    view pipeline; DDP-wrapped when ``distributed``.

    Example:
        One PW-Self step on float images in [0, 1], then its loss terms:

        >>> import torch, pwself
        >>> cfg = pwself.load_config(None, ["data.kind=synthetic", "backbone.embed_dim=32", "backbone.depth=1",
        ...                                 "backbone.num_heads=2", "head.out_dim=64"])
        >>> step = pwself.build_step(cfg, torch.device("cpu"), mean=[0.5], std=[0.25])
        >>> out, grad_norm = step(torch.rand(8, 1, 28, 28), teacher_temp=0.04, momentum=0.996,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> sorted(out.terms)
        ['cls', 'loss', 'n_match', 'patch']
    """
    torch.manual_seed(cfg.seed)
    masked = objective_class(cfg.loss.objective).uses_mask_token
    model = DistillNet(cfg.backbone, cfg.head, cfg.views.global_size, mask_token=masked)
    if cfg.backbone.init and load_init:
        from pwself.init_weights import load_start

        log.info(load_start(model, cfg.backbone.init))
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    model = model.to(device, dtype)
    # The anchor is the starting model; a resumed run overwrites it with the checkpoint's (the same weights).
    anchor = (GramAnchor(copy.deepcopy(model.backbone).requires_grad_(False).eval(), cfg.loss.gram_weight)
              if cfg.loss.gram_weight else None)
    with portable_init():
        objective = make_objective(cfg)
    objective = objective.to(device, dtype)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    named = [*model.named_parameters(), *objective.named_parameters(prefix="objective")]
    # The fused kernel (CPU and CUDA) is one op for all parameters, several times faster than the loop.
    o = cfg.optim
    groups = param_groups(iter(named), split_backbone=o.head_warmup_epochs > 0 or o.layer_decay < 1,
                          layer_decay=o.layer_decay, depth=cfg.backbone.depth)
    optimizer = torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))
    student: nn.Module = model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        student = DistributedDataParallel(model, device_ids=ids)
        objective.wrap_trainable(lambda m: DistributedDataParallel(m, device_ids=ids))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return TrainStep(student, teacher, objective, optimizer, scaler, ViewPipeline(cfg, mean, std, device, dtype),
                     cfg.optim.clip_grad, amp_dtype, anchor)
