"""PW-Self pretraining: views -> photometric augmentation -> ViT -> patch matching -> loss -> AdamW + EMA.

The whole step is visible in :func:`distill_step` and :func:`train`; schedules are arrays indexed by the
global step (dinov2's habit), the head's last layer is frozen by a zero learning rate, and every random
draw comes from one seeded generator whose state is checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pwself.augment import PhotometricAugment
from pwself.checkpoint import CheckpointError, export_backbone, latest_checkpoint, load_checkpoint, save_checkpoint
from pwself.config import TrainConfig, config_diff, config_from_dict, config_to_dict, save_config
from pwself.data import TensorImageDataset, build_dataset, channel_stats, iterate_batches
from pwself.distributed import all_true, allreduce_gradients, gather_objects, init_distributed
from pwself.losses import LoGoAffinity, PatchWiseDistillationLoss, view_pairs
from pwself.matching import match_views, match_views_by_features
from pwself.models import DINOHead, ema_update, forward_tokens, make_vit
from pwself.views import MultiCrop, MultiCropViews

__all__ = [
    "Schedules",
    "make_schedules",
    "build_student",
    "param_groups",
    "distill_step",
    "train",
    "TrainResult",
    "open_dataset",
]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the last good checkpoint is untouched."""


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> list[float]:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``."""
    out = [warmup_start + (base - warmup_start) * i / warmup for i in range(min(warmup, total))]
    rest = total - len(out)
    out += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / max(rest, 1))) for i in range(rest)]
    return out


@dataclass(frozen=True)
class Schedules:
    """Per-step values: learning rate, weight decay, teacher momentum and temperature, last-layer lr factor."""

    lr: list[float]
    weight_decay: list[float]
    momentum: list[float]
    teacher_temp: list[float]
    last_layer_on: list[bool]


def make_schedules(cfg: TrainConfig, steps_per_epoch: int, world_size: int = 1) -> Schedules:
    """DINO's schedules for ``cfg.epochs * steps_per_epoch`` steps (lr scaled by the global batch / 256)."""
    total = cfg.epochs * steps_per_epoch
    o, lc = cfg.optim, cfg.loss
    peak = o.lr * cfg.batch_size * world_size / 256
    lr = cosine_schedule(peak, o.min_lr, total, int(o.warmup_epochs * steps_per_epoch))
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    mom = cosine_schedule(o.momentum_teacher, 1.0, total)
    warm = int(lc.warmup_teacher_temp_epochs * steps_per_epoch)
    temp = [
        lc.warmup_teacher_temp + (lc.teacher_temp - lc.warmup_teacher_temp) * min(i / warm, 1.0) if warm else lc.teacher_temp
        for i in range(total)
    ]
    freeze = int(o.freeze_last_layer_epochs * steps_per_epoch)
    return Schedules(lr, wd, mom, temp, [i >= freeze for i in range(total)])


class Student(nn.Module):
    """Backbone + DINO head (the teacher is a deep copy updated by EMA)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.backbone = make_vit(cfg.backbone)
        self.head = DINOHead(cfg.backbone.embed_dim, cfg.head)
        # LoGo's affinity network trains with the student (its own loss) and is ignored by the teacher.
        self.affinity = LoGoAffinity(cfg.backbone.embed_dim) if cfg.loss.objective == "logo" else None


def build_student(cfg: TrainConfig) -> Student:
    """Create the student network for a config (seed the global RNG first for a fixed init)."""
    return Student(cfg)


def param_groups(model: Student) -> list[dict[str, Any]]:
    """AdamW groups tagged ``decay`` and ``last_layer``: no decay on biases, norms and position/CLS tokens."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token", "reg_token"))
        last = name.startswith("head.last_layer")
        groups.setdefault((decay, last), []).append(p)
    return [{"params": ps, "decay": d, "last_layer": last} for (d, last), ps in sorted(groups.items())]


def apply_schedules(opt: torch.optim.Optimizer, sch: Schedules, step: int) -> None:
    """Set lr and weight decay of every group for ``step`` (last layer lr is 0 while frozen)."""
    for g in opt.param_groups:
        g["lr"] = sch.lr[step] if (sch.last_layer_on[step] or not g["last_layer"]) else 0.0
        g["weight_decay"] = sch.weight_decay[step] if g["decay"] else 0.0


def distill_step(
    student: Student,
    teacher: Student,
    criterion: PatchWiseDistillationLoss,
    views: MultiCropViews,
    grids: list[tuple[int, int]],
    teacher_temp: float,
    matcher: str = "geometric",
    logo_weight: float = 0.5,
    patch_fraction: float = 1.0,
    generator: torch.Generator | None = None,
    recompute_head: bool = False,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Forward both networks on the views and compute the loss.

    The head runs only on the tokens the loss uses: CLS tokens, and for patch objectives each matched
    patch token once (gathered before the head, as dinov2 does for iBOT), however many pairs use it.
    With ``patch_fraction < 1`` each patch pair is kept with that probability (drawn from the CPU
    ``generator``) and reweighted (see :class:`pwself.config.LossConfig`). With ``recompute_head`` the
    student head on the patch tokens runs under activation checkpointing.

    Returns:
        ``(terms, teacher CLS logits [G, B, K], teacher logits [U, K] of the distinct matched teacher patch
        tokens, or None)``;
        ``terms["loss"]`` carries the graph.
    """
    g, n_loc, b = views.n_global, views.n_local, views.batch_size
    n_views = g + n_loc
    pairs = view_pairs(g, n_views)

    with torch.no_grad():
        t = forward_tokens(teacher.backbone, views.global_crops)
    s_g = forward_tokens(student.backbone, views.global_crops)
    s_l = forward_tokens(student.backbone, views.local_crops) if n_loc else None

    s_cls_tokens = torch.cat([s_g.cls] + ([s_l.cls] if s_l is not None else []))
    if criterion.objective == "bagssl":
        # Co-occurrence: every view predicts the bag (mean of the teacher's view representations).
        s_cls = student.head(s_cls_tokens).unflatten(0, (n_views, b))
        with torch.no_grad():
            t_bag = teacher.head(t.cls.unflatten(0, (g, b)).mean(0))[None]  # [1, B, K]
        return criterion(s_cls, t_bag, [(0, j) for j in range(n_views)], teacher_temp), t_bag, None
    if not criterion.uses_patches:
        s_cls = student.head(s_cls_tokens).unflatten(0, (n_views, b))
        with torch.no_grad():
            t_cls = teacher.head(t.cls).unflatten(0, (g, b))
        terms = criterion(s_cls, t_cls, pairs, teacher_temp)
        if criterion.objective == "logo":
            if student.affinity is None or s_l is None:
                raise ValueError("objective logo needs the student's affinity network and local views")
            encoder_term, affinity_loss = student.affinity.terms(s_l.cls.unflatten(0, (n_loc, b)))
            terms = {**terms, "loss": terms["loss"] + logo_weight * encoder_term + affinity_loss,
                     "local_affinity": encoder_term.detach(), "affinity_loss": affinity_loss.detach()}
        return terms, t_cls, None

    dev = views.global_crops.device
    s_patches = [s_g.patches.flatten(0, 1)] + ([s_l.patches.flatten(0, 1)] if s_l is not None else [])
    tokens_per_view = torch.tensor([s_g.patches.shape[1]] * g + ([s_l.patches.shape[1]] * n_loc if n_loc else []),
                                   device=dev)
    view_offset = torch.cumsum(tokens_per_view * b, 0) - tokens_per_view * b
    n_s_cls = n_views * b
    # Every patch pair of the loss is (teacher key, student key, p * B + b); a key is a flat token index.
    if criterion.objective == "cossl":
        # Every student patch token of view j is pulled towards the teacher CLS of view i: the teacher
        # keys are rows of the teacher CLS outputs.
        s_key, t_key, pair_idx = [], [], []
        for p, (i, j) in enumerate(pairs):
            n_tok = int(tokens_per_view[j])
            sample = torch.arange(b, device=dev).repeat_interleave(n_tok)
            s_key.append(view_offset[j] + torch.arange(b * n_tok, device=dev))
            t_key.append(i * b + sample)
            pair_idx.append(p * b + sample)
        s_key, t_key, pair_idx = torch.cat(s_key), torch.cat(t_key), torch.cat(pair_idx)
    else:
        if matcher == "geometric":
            t_tok, s_tok, pair_idx, sample = (x.to(dev) for x in match_views(views.boxes, views.flips, grids, pairs))
        elif matcher == "feature-nn":  # content instead of geometry, to measure what geometry buys
            s_views = list(s_g.patches.unflatten(0, (g, b))) + (list(s_l.patches.unflatten(0, (n_loc, b))) if n_loc else [])
            t_tok, s_tok, pair_idx, sample = match_views_by_features(list(t.patches.unflatten(0, (g, b))), s_views, pairs)
        else:
            raise ValueError(f"matcher {matcher!r}: use geometric or feature-nn")
        view_t = torch.tensor([i for i, _ in pairs], device=dev)[pair_idx // b]
        view_s = torch.tensor([j for _, j in pairs], device=dev)[pair_idx // b]
        s_key = view_offset[view_s] + sample * tokens_per_view[view_s] + s_tok
        t_key = (view_t * b + sample) * t.patches.shape[1] + t_tok

    patch_count, patch_weight = None, 1.0
    if patch_fraction < 1.0:  # a random subset of the pairs, reweighted: an unbiased, cheaper loss
        patch_count = torch.bincount(pair_idx, minlength=len(pairs) * b)
        keep = (torch.rand(len(pair_idx), generator=generator) < patch_fraction).to(dev)
        s_key, t_key, pair_idx = s_key[keep], t_key[keep], pair_idx[keep]
        patch_weight = 1.0 / patch_fraction

    # A token used by several pairs (a local view seen by both teachers) goes through the head once:
    # unique keys, gathered before the head (as dinov2 does for iBOT), expanded back with the inverse.
    s_unique, s_inverse = torch.unique(s_key, return_inverse=True)
    head_fn = None
    if recompute_head:  # the criterion runs the head on the patch tokens under checkpointing
        s_cls = student.head(s_cls_tokens).unflatten(0, (n_views, b))
        s_patch, head_fn = torch.cat(s_patches)[s_unique], student.head
    else:
        s_out = student.head(torch.cat([s_cls_tokens, torch.cat(s_patches)[s_unique]]))
        s_cls, s_patch = s_out[:n_s_cls].unflatten(0, (n_views, b)), s_out[n_s_cls:]
    if criterion.objective == "cossl":
        with torch.no_grad():
            t_cls = teacher.head(t.cls).unflatten(0, (g, b))
        terms = criterion(s_cls, t_cls, pairs, teacher_temp, s_patch, t_cls.flatten(0, 1), pair_idx, s_inverse, t_key,
                          patch_count, patch_weight, head_fn)
        return terms, t_cls, None
    t_unique, t_inverse = torch.unique(t_key, return_inverse=True)
    with torch.no_grad():
        t_out = teacher.head(torch.cat([t.cls, t.patches.flatten(0, 1)[t_unique]]))
    t_cls, t_patch = t_out[: g * b].unflatten(0, (g, b)), t_out[g * b :]
    terms = criterion(s_cls, t_cls, pairs, teacher_temp, s_patch, t_patch, pair_idx, s_inverse, t_inverse,
                      patch_count, patch_weight, head_fn)
    return terms, t_cls, t_patch


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its final kNN accuracy (if evaluated)."""

    run_dir: Path
    checkpoint: Path
    backbone: Path
    knn: dict[int, dict[str, float]] | None


def open_dataset(cfg: TrainConfig, split: str):  # noqa: ANN201 - returns a torch Dataset
    """Open a split of the configured dataset."""
    d = cfg.data
    channels = cfg.backbone.in_chans
    return build_dataset(
        d.kind,
        d.root,
        split,
        image_size=d.image_size,
        channels=channels,
        min_size=cfg.backbone.patch_size,
        on_bad_image=d.on_bad_image,
        synthetic_size=d.synthetic_size,
        synthetic_classes=d.synthetic_classes,
        seed=cfg.seed,
    )


def take_subset(dataset: torch.utils.data.Dataset, n: int) -> torch.utils.data.Dataset:
    """The first ``n`` images of a dataset (in-memory datasets stay in memory)."""
    n = min(n, len(dataset))
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[:n], dataset.labels[:n], dataset.classes)
    return torch.utils.data.Subset(dataset, range(n))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_batches(n: int, batch: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """This rank's index batches of one epoch: a seeded permutation cut into global batches of
    ``batch * world_size`` (last partial one dropped), rank ``r`` taking the ``r``-th slice of each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    glob = batch * world_size
    return [chunk[rank * batch : (rank + 1) * batch] for chunk in perm[: (n // glob) * glob].split(glob)]


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows past ``step`` (they were written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", -1) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _collapse_kind(entropy: float, mean_entropy: float, out_dim: int) -> str:
    """'' or which DINO collapse the teacher CLS statistics show (entropies in nats)."""
    log_k = math.log(out_dim)
    if mean_entropy < 0.1 * log_k:
        return "one dimension dominates every image: entropy of the batch mean is near 0"
    if entropy > 0.98 * log_k:
        return "uniform outputs: every image's distribution is near uniform"
    return ""


def _host_rng() -> dict[str, Any]:
    """Python and numpy global RNG states as plain lists (loadable with ``weights_only=True``).

    pwself draws nothing from them, but user datasets and transforms may."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(state), gauss], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_host_rng(s: dict[str, Any]) -> None:
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _entropies(t_cls: Tensor, center: Tensor, temp: float) -> tuple[float, float]:
    """Mean per-sample entropy and entropy of the batch-mean of the teacher CLS distribution (nats)."""
    p = torch.softmax((t_cls.reshape(-1, t_cls.shape[-1]).float() - center) / temp, -1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    pm = p.mean(0)
    return float(ent), float(-(pm * pm.clamp_min(1e-12).log()).sum())


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Pretrain a ViT with the configured objective; checkpoint every epoch; optionally resume.

    Args:
        cfg: The run configuration (validated here).
        resume: Continue from the newest checkpoint in ``cfg.out_dir`` (error if there is none or if the
            saved config differs in a key that changes what is learned).
        progress: Show a tqdm progress bar.

    Returns:
        The run's :class:`TrainResult`.
    """
    cfg.validate()
    run_dir = Path(cfg.out_dir)
    info = init_distributed(cfg.device)
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    dataset = open_dataset(cfg, "train")
    image = dataset[0][0]
    if image.shape[0] != cfg.backbone.in_chans:
        raise ValueError(
            f"the data has {image.shape[0]} channel(s) but backbone.in_chans={cfg.backbone.in_chans}: "
            f"set backbone.in_chans={image.shape[0]}"
        )
    if min(image.shape[-2:]) < cfg.views.local_size:
        raise ValueError(
            f"images of {tuple(image.shape[-2:])} px are smaller than views.local_size={cfg.views.local_size}: "
            "use smaller views or larger images (data.image_size for folders)"
        )
    if cfg.data.subset:
        dataset = take_subset(dataset, cfg.data.subset)
    steps_per_epoch = len(dataset) // (cfg.batch_size * info.world_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} x {info.world_size} process(es) is larger than the dataset "
            f"({len(dataset)} images): lower it"
        )

    ckpt = None
    if resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint in {run_dir}; start without --resume")
        ckpt = load_checkpoint(found)
        saved = ckpt["config"]
        if len(ckpt["generators"]) != info.world_size:
            raise CheckpointError(
                f"cannot resume {found}: it was written by {len(ckpt['generators'])} process(es), this run has "
                f"{info.world_size}; resume with the same number of processes"
            )
        if not cfg.data.mean and saved["data"]["mean"]:
            cfg.data.mean, cfg.data.std = list(saved["data"]["mean"]), list(saved["data"]["std"])
        diff = config_diff(saved, config_to_dict(cfg))
        if diff:
            raise CheckpointError(
                f"cannot resume {found}: config differs in {', '.join(diff)}; use the saved "
                f"{run_dir / 'config.yaml'} or a new out_dir"
            )
    if not cfg.data.mean:
        cfg.data.mean, cfg.data.std = channel_stats(dataset)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(cfg.seed)
    student = build_student(cfg).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    crit = PatchWiseDistillationLoss(
        cfg.head.out_dim, cfg.loss.objective, cfg.loss.lam, cfg.loss.student_temp, cfg.loss.center_momentum
    ).to(device)
    # The fused kernel (CPU and CUDA) is one op for all parameters: ~5x faster than the per-tensor loop.
    opt = torch.optim.AdamW(param_groups(student), fused=device.type in ("cpu", "cuda"))
    sch = make_schedules(cfg, steps_per_epoch, info.world_size)
    multicrop = MultiCrop(
        cfg.views.n_global, cfg.views.n_local, cfg.views.global_size, cfg.views.local_size,
        cfg.views.global_scale, cfg.views.local_scale, flip_p=cfg.views.flip_p,
    )
    augment = PhotometricAugment(cfg.photometric, cfg.backbone.patch_size)
    gen = torch.Generator().manual_seed(cfg.seed + 1000003 * info.rank)  # rank 0 = single-process run
    p = cfg.backbone.patch_size
    grids = [(cfg.views.global_size // p,) * 2] * cfg.views.n_global + [(cfg.views.local_size // p,) * 2] * cfg.views.n_local
    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    metrics_path = run_dir / "metrics.jsonl"

    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device: use precision=bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    n_skipped, bad_in_a_row, warned_collapse = 0, 0, False

    step = 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        opt.load_state_dict(ckpt["optimizer"])
        crit.load_state_dict(ckpt["criterion"])
        scaler.load_state_dict(ckpt["scaler"])
        n_skipped = int(ckpt.get("skipped_steps", 0))
        gen.set_state(ckpt["generators"][info.rank])
        torch.set_rng_state(ckpt["torch_rngs"][info.rank])
        _set_host_rng(ckpt["host_rngs"][info.rank])
        step = int(ckpt["step"])
        if info.is_main:
            _truncate_metrics(metrics_path, step)
    elif metrics_path.exists() and info.is_main:
        metrics_path.unlink()

    total = cfg.epochs * steps_per_epoch
    student.train()
    teacher.train()  # no dropout/BN in the ViT; drop_path is inactive in the copy's eval-free forward
    bar = tqdm(total=total, initial=step, disable=not progress or not info.is_main, desc=f"pretrain {cfg.loss.objective}", unit="step")
    t_last, n_imgs = time.perf_counter(), 0
    last_ckpt = latest_checkpoint(run_dir) if ckpt is not None else None
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        batches = _epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch, info.rank, info.world_size)[start:]
        for images, _ in iterate_batches(dataset, batches, cfg.data.num_workers):
            apply_schedules(opt, sch, step)
            x = images.to(device, non_blocking=True).float() / 255
            views = multicrop(x, gen)
            views = MultiCropViews(
                (augment(views.global_crops, gen) - mean) / std,
                (augment(views.local_crops, gen) - mean) / std,
                views.boxes, views.flips, views.n_global, views.n_local,
            )
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                terms, t_cls, t_patch = distill_step(student, teacher, crit, views, grids, sch.teacher_temp[step],
                                                     cfg.loss.matcher, cfg.loss.logo_weight, cfg.loss.patch_fraction, gen,
                                                     cfg.loss.recompute_head)
            loss = terms["loss"]
            grad_norm = float("nan")
            if all_true(bool(torch.isfinite(loss)), device):  # every rank takes the same branch
                bad_in_a_row = 0
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                allreduce_gradients(student)
                scaler.unscale_(opt)
                if cfg.optim.clip_grad > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad))
                scaler.step(opt)
                scaler.update()
                ema_update(teacher, student, sch.momentum[step])
                crit.update_centers(t_cls, t_patch)
            else:
                # Skip the update (no backward, no EMA, no centers); stop when it keeps happening.
                n_skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row > cfg.optim.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} for {bad_in_a_row} steps in a row (step {step}, epoch {epoch}): "
                        f"lower optim.lr or raise loss.teacher_temp; the last good checkpoint is {last_ckpt}"
                    )
            step += 1
            n_imgs += x.shape[0] * info.world_size
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                ent, ent_mean = _entropies(t_cls, crit.cls_center.center, sch.teacher_temp[step - 1])
                collapse = _collapse_kind(ent, ent_mean, cfg.head.out_dim)
                if collapse and not warned_collapse and step > steps_per_epoch and info.is_main:
                    warnings.warn(f"step {step}: the teacher looks collapsed ({collapse}); try a lower "
                                  "loss.teacher_temp, a higher optim.lr warm-up or a lower momentum", stacklevel=2)
                    warned_collapse = True
                row = {
                    "step": step, "epoch": step / steps_per_epoch,
                    **{k: round(float(v.detach()), 6) for k, v in terms.items()},
                    "lr": sch.lr[step - 1], "weight_decay": sch.weight_decay[step - 1],
                    "momentum": sch.momentum[step - 1], "teacher_temp": sch.teacher_temp[step - 1],
                    "grad_norm": round(grad_norm, 4), "skipped_steps": n_skipped, "teacher_entropy": round(ent, 4),
                    "teacher_mean_entropy": round(ent_mean, 4),
                    "kl_mean_to_uniform": round(math.log(cfg.head.out_dim) - ent_mean, 4), "images_per_s": round(n_imgs / (now - t_last), 2),
                }
                if info.is_main:
                    _write_metrics(metrics_path, [row])  # a resumed run truncates rows past its checkpoint
                bar.set_postfix(loss=f"{row['loss']:.3f}", n_match=f"{row['n_match']:.1f}")
                t_last, n_imgs = now, 0
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0):
                generators, torch_rngs = gather_objects(gen.get_state()), gather_objects(torch.get_rng_state())
                host_rngs = gather_objects(_host_rng())
                if info.is_main:
                    state = {
                        "student": student.state_dict(), "teacher": teacher.state_dict(),
                        "optimizer": opt.state_dict(), "criterion": crit.state_dict(), "scaler": scaler.state_dict(),
                        "skipped_steps": n_skipped, "generators": generators, "torch_rngs": torch_rngs,
                        "host_rngs": host_rngs,
                        "step": step, "epoch": step // steps_per_epoch, "config": config_to_dict(cfg),
                        "world_size": info.world_size,
                    }
                    last_ckpt = save_checkpoint(state, run_dir, step, cfg.keep_checkpoints)
                if end_of_epoch and cfg.knn_every_epochs and (step // steps_per_epoch) % cfg.knn_every_epochs == 0 \
                        and step < total:
                    res = evaluate_knn_run(teacher.backbone, cfg, progress=False)
                    if info.is_main:
                        _write_metrics(run_dir / "knn_history.jsonl", [{"step": step, "epoch": step // steps_per_epoch,
                                                                        "knn": res}])
            if step >= total:
                break
    bar.close()
    skipped = getattr(dataset, "skipped", None) or getattr(getattr(dataset, "dataset", None), "skipped", None)
    if skipped and info.is_main:
        print(f"skipped {len(skipped)} unreadable image(s) (data.on_bad_image=skip), listed above", file=sys.stderr)
    backbone_path = run_dir / "teacher_backbone.safetensors"
    if info.is_main:
        export_backbone(teacher.backbone, backbone_path)
    knn = None
    if cfg.knn_at_end:
        knn = evaluate_knn_run(teacher.backbone, cfg, progress=progress and info.is_main)
        if info.is_main:
            (run_dir / "knn.json").write_text(json.dumps({"step": step, "knn": knn}, indent=2))
    return TrainResult(run_dir, Path(last_ckpt or latest_checkpoint(run_dir) or run_dir), backbone_path, knn)


def evaluate_knn_run(
    backbone: nn.Module, cfg: TrainConfig, ks: tuple[int, ...] = (10, 20), progress: bool = True
) -> dict[int, dict[str, float]]:
    """kNN of a backbone on the configured dataset's train (bank) and test splits."""
    from pwself.eval import extract_features, knn_classify

    device = next(backbone.parameters()).device
    train_set, test_set = open_dataset(cfg, "train"), open_dataset(cfg, "test")
    kw = dict(mean=cfg.data.mean, std=cfg.data.std, size=cfg.views.global_size, device=device, progress=progress,
              num_workers=cfg.data.num_workers)
    if cfg.loss.objective == "bagssl":  # BagSSL's own aggregation: tiles of the image at native resolution
        kw["pooling"], kw["size"] = "bag", None
    f_tr, y_tr = extract_features(backbone, train_set, desc="features train", **kw)
    f_te, y_te = extract_features(backbone, test_set, desc="features test", **kw)
    ks = tuple(k for k in ks if k <= len(f_tr)) or (len(f_tr),)
    return knn_classify(f_tr, y_tr, f_te, y_te, ks=ks)


def config_of_checkpoint(ckpt: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint."""
    return config_from_dict(ckpt["config"])
