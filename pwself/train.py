"""PW-Self pretraining: prepare the run (or resume it), build the step, loop over batches, log, checkpoint.

The step itself lives in :mod:`pwself.step`; schedules in :mod:`pwself.schedules`. Every random draw comes
from one seeded generator per rank whose state is checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pwself.config import (
    TrainConfig,
    config_to_dict,
    run_config,
    save_config,
)
from pwself.data import (
    DATA_KINDS,
    channel_stats,
    check_data_root,
    expand_path,
    has_heldout_split,
    iterate_batches,
    open_training_data,
)
from pwself.data.crops import FolderMultiCrop, ViewLoader
from pwself.diagnostics import FIXES, CollapseWatch, collapse_kind, effective_rank
from pwself.loggers import MetricLoggers, check_loggers
from pwself.run.checkpoint import (
    CheckpointError,
    checkpoint_record,
    export_backbone,
    latest_checkpoint,
    progress_of,
    resume_checkpoint,
    save_checkpoint,
)
from pwself.run.folder import RunFolder, RunLock, prepare_run_dir
from pwself.run.state import write_finished
from pwself.runtime import STOP_SIGNALS, DistInfo, Preempted, any_true, gather_objects, init_distributed, resolve_device
from pwself.schedules import (
    Schedules,
    apply_schedules,
    batch_line,
    log_interval,
    make_schedules,
    schedule_problems,
)
from pwself.step import StepOutput, TrainStep, build_step
from pwself.views import MultiCropViews

__all__ = ["train", "TrainResult", "NonFiniteLossError", "EvalCallback", "Moment"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss stayed NaN/Inf; the last good checkpoint is untouched."""


class _StopSignals:
    """While a run trains, a stop signal only sets a flag: the step in progress finishes, then the run writes a
    checkpoint and stops (:class:`Preempted`). Outside the main thread (a library caller's worker) nothing is
    installed."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    """Where a run wrote its outputs, the config it ran with (measured channel statistics filled in) and
    its final kNN accuracy (if evaluated)."""

    run_dir: Path
    checkpoint: Path
    backbone: Path
    knn: dict[int, dict[str, float]] | None
    config: TrainConfig
    floors: dict[str, dict[str, float] | None] | None = None


@dataclass(frozen=True)
class Moment:
    """Where a run stands when an evaluation callback is called.

    Attributes:
        step, epoch: Optimizer steps done, and as passes over the data.
        train_s, cpu_s: Wall and CPU seconds of training so far (evaluations excluded).
        folder: The run folder (write only where ``is_main``).
        loggers: The run's metric sinks (``None`` but on the main process).
        heldout, labelled: Whether the data has a labelled held-out split; whether its images have labels.
        is_main: The process that writes (rank 0; the only one without torchrun).
    """

    step: int
    epoch: float
    train_s: float
    cpu_s: float
    folder: RunFolder
    loggers: MetricLoggers | None
    heldout: bool
    labelled: bool
    is_main: bool


class EvalCallback(typing.Protocol):
    """One evaluation of a pretraining run, given by the caller (:func:`pwself.experiment.standard_evaluation`:
    the dense probe, kNN and its floors): training itself evaluates nothing and writes no score file. Every
    process calls it (an evaluation may gather over them); only ``at.is_main`` writes."""

    def start(self, cfg: TrainConfig, at: Moment) -> None:
        """Before step 1: check what the evaluation will read, say what it will skip."""

    def every(self, cfg: TrainConfig, at: Moment) -> float:
        """Epochs between points during training (0: none)."""

    def point(self, backbone: nn.Module, cfg: TrainConfig, at: Moment) -> None:
        """One point during training (its time is not training time)."""

    def final(self, backbone: nn.Module, cfg: TrainConfig, at: Moment, progress: bool) -> dict[str, Any]:
        """At the end, after the export; what it returns is stored in ``finished.json`` (e.g. ``{"knn": ..}``)."""


@dataclass
class _Run:
    """A prepared run: its config (a copy; the caller's is never written), data and where it starts."""

    cfg: TrainConfig
    dir: Path
    dataset: torch.utils.data.Dataset
    steps_per_epoch: int
    info: DistInfo
    device: torch.device
    ckpt: dict[str, Any] | None
    views: ViewLoader | None = None  # folders: views cut from the originals in worker processes
    heldout: bool = True  # a labelled held-out split exists: kNN can run
    labelled: bool = True  # the images have labels
    data_id: dict[str, Any] | None = None  # the training data's root, image count and content fingerprint
    loggers: MetricLoggers | None = None  # rank 0 only
    lock: RunLock | None = None  # rank 0 only
    evaluation: Sequence[EvalCallback] = ()
    stop: _StopSignals | None = None  # set while the loop runs
    log_every: int = 10  # cfg.log_every, lowered for a short run (schedules.log_interval)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.dir)


def prepare_run(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> _Run:
    """Validate, join torchrun, claim the run folder, open the data, load the checkpoint to resume, measure
    channel statistics and write ``config.yaml``."""
    cfg = run_config(cfg)
    check_loggers(cfg.log)
    if cfg.backbone.init and not resume and not expand_path(cfg.backbone.init).exists():
        raise CheckpointError(f"backbone.init={cfg.backbone.init} does not exist: pass a local weights file or "
                              "folder (nothing is downloaded)")
    info = init_distributed(cfg.device)
    device = resolve_device(cfg.device, info)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device: use precision=bf16 on CPU")
    run_dir, lock = expand_path(cfg.out_dir), None
    check_data_root(cfg.data, run_dir, resume, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)
    if info.is_main:  # before any data is read: a wrong folder fails in a second, not after the scan
        lock, moved = prepare_run_dir(run_dir, resume, overwrite)
        if moved is not None:
            log.warning("--overwrite: the run that was in %s is now in %s", run_dir, moved)
    try:
        return _open_run(cfg, resume, info, device, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _open_run(cfg: TrainConfig, resume: bool, info: DistInfo, device: torch.device, run_dir: Path,
              lock: RunLock | None) -> _Run:
    data = open_training_data(cfg.data, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed, cfg.views.local_size)
    dataset, data_id = data.dataset, data.ident
    views = None if DATA_KINDS[cfg.data.kind].in_memory else _folder_views(cfg, dataset, device)
    steps_per_epoch = len(dataset) // (cfg.batch_size * info.world_size)
    if steps_per_epoch == 0:
        most = len(dataset) // info.world_size
        raise ValueError(f"batch_size={cfg.batch_size} x {info.world_size} process(es) is larger than the dataset "
                         f"({len(dataset)} images): lower it, e.g. --batch-size {most} (or batch_size={most})")
    ckpt = resume_checkpoint(cfg, run_dir, info.world_size, data_id) if resume else None
    if not cfg.data.mean:
        cfg.data.mean, cfg.data.std = channel_stats(dataset)
    if info.is_main:
        save_config(cfg, RunFolder(run_dir).config, derived=batch_line(cfg, info.world_size))
        log.info(batch_line(cfg, info.world_size))
    return _Run(cfg, run_dir, dataset, steps_per_epoch, info, device, ckpt, views,
                has_heldout_split(cfg.data, data.labelled), data.labelled, lock=lock, data_id=data_id)


def _folder_views(cfg: TrainConfig, dataset: torch.utils.data.Dataset, device: torch.device) -> ViewLoader:
    """Views of a folder's images cut from the full-resolution originals in DataLoader workers."""
    base = getattr(dataset, "dataset", dataset)  # a Subset keeps the first images
    n = len(dataset)
    crops = FolderMultiCrop(base.files[:n], cfg.backbone.in_chans, cfg.views, cfg.seed, base.max_side,
                            base.cache_dir, base.digests[:n])
    return ViewLoader(crops, cfg.data.num_workers, pin_memory=device.type == "cuda")


def _epoch_batches(n: int, batch: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """This rank's index batches of one epoch: a seeded permutation cut into global batches of
    ``batch * world_size`` (last partial one dropped), rank ``r`` taking the ``r``-th slice of each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    glob = batch * world_size
    return [chunk[rank * batch : (rank + 1) * batch] for chunk in perm[: (n // glob) * glob].split(glob)]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows past ``step`` (they were written after the checkpoint we resume from) and a torn line
    (a kill or a full disk during a write), with a notice."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is torn (a write was cut off): dropped", path, n)
            continue
        if row.get("step", -1) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


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
    p = torch.softmax((t_cls.reshape(-1, t_cls.shape[-1]).to(center.dtype) - center) / temp, -1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    pm = p.mean(0)
    return float(ent), float(-(pm * pm.clamp_min(1e-12).log()).sum())


@dataclass
class _Progress:
    """Counters that live across steps and go into checkpoints and log rows."""

    step: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    collapse: CollapseWatch = field(default_factory=CollapseWatch)
    images: int = 0
    t_last: float = 0.0
    train_s: float = 0.0  # seconds spent training (in-loop kNN excluded): the x axis of a learning curve
    t_mark: float = 0.0  # when train_s was last brought up to date
    cpu_s: float = 0.0  # CPU seconds of this process (all its threads) spent training: immune to other load
    cpu_mark: float = 0.0
    last_ckpt: Path | None = None
    t_ckpt: float = 0.0  # monotonic time of the last checkpoint (or of the start)
    weight_norm_ref: float = 0.0  # the student's weight norm at the start: a checkpoint far above it is not kept


def _restore(step: TrainStep, ckpt: dict[str, Any], gen: torch.Generator, rank: int) -> _Progress:
    """Load every state of a checkpoint into the step, the generators and the counters."""
    step.load_state_dict(ckpt)
    gen.set_state(ckpt["generators"][rank])
    torch.set_rng_state(ckpt["torch_rngs"][rank])
    _set_host_rng(ckpt["host_rngs"][rank])
    return _Progress(**progress_of(ckpt))


def _tick(prog: _Progress) -> float:
    """Add the wall and CPU time since the last mark to the training time; now."""
    now, cpu = time.perf_counter(), time.process_time()
    prog.train_s, prog.t_mark = prog.train_s + now - prog.t_mark, now
    prog.cpu_s, prog.cpu_mark = prog.cpu_s + cpu - prog.cpu_mark, cpu
    return now


def _log_row(run: _Run, step: TrainStep, out: StepOutput, sch: Schedules, prog: _Progress,
             grad_norm: float) -> dict[str, Any]:
    """The metrics row of the step just taken; warns once when the teacher looks collapsed."""
    cfg, i = run.cfg, prog.step - 1
    now = _tick(prog)
    ent, ent_mean = _entropies(out.teacher.cls, step.objective.cls_center.center, sch.teacher_temp[i])
    rank_cls = effective_rank(out.teacher.cls_tokens)
    patches = out.teacher.global_patches
    diagnostics = {"teacher_entropy_rel": round(ent / math.log(cfg.head.out_dim), 4), "rank_cls": round(rank_cls, 3),
                   **({"rank_patch": round(effective_rank(patches.flatten(0, 1)), 3)} if patches is not None else {}),
                   **({"kl_cls": round(float(out.terms["cls"].detach()) - ent, 4)} if "cls" in out.terms else {})}
    kind = collapse_kind(ent, ent_mean, cfg.head.out_dim, rank_cls)
    if prog.collapse.update(kind) and run.info.is_main:
        log.warning("step %d: the run looks collapsed (%s) for %d logged steps in a row; what usually fixes it: %s",
                    prog.step, kind, prog.collapse.streak, FIXES)
    row = {
        "step": prog.step, "epoch": prog.step / run.steps_per_epoch,
        **{k: round(float(v.detach()), 6) for k, v in out.terms.items()},
        "lr": sch.lr[i], "weight_decay": sch.weight_decay[i], "momentum": sch.momentum[i],
        "teacher_temp": sch.teacher_temp[i], "grad_norm": round(grad_norm, 4), "skipped_steps": prog.skipped,
        "teacher_entropy": round(ent, 4), "teacher_mean_entropy": round(ent_mean, 4),
        "kl_mean_to_uniform": round(math.log(cfg.head.out_dim) - ent_mean, 4), **diagnostics,
        "images_per_s": round(prog.images / (now - prog.t_last), 2), "train_s": round(prog.train_s, 2),
        "cpu_s": round(prog.cpu_s, 2),
    }
    prog.t_last, prog.images = now, 0
    return row


def _checkpoint_state(run: _Run, step: TrainStep, gen: torch.Generator, prog: _Progress) -> dict[str, Any] | None:
    """Everything a resume needs (every rank's generators gathered); ``None`` on ranks other than 0."""
    generators, torch_rngs = gather_objects(gen.get_state()), gather_objects(torch.get_rng_state())
    host_rngs = gather_objects(_host_rng())
    _tick(prog)
    if not run.info.is_main:
        return None
    return checkpoint_record(step.state_dict(), config_to_dict(run.cfg), step=prog.step, skipped=prog.skipped,
                             train_s=prog.train_s, cpu_s=prog.cpu_s, epoch=prog.step // run.steps_per_epoch,
                             world_size=run.info.world_size, rngs=(generators, torch_rngs, host_rngs),
                             dataset=run.data_id, weight_norm_ref=prog.weight_norm_ref)


WEIGHT_NORM_LIMIT = 10.0  # a checkpoint's student weights may be at most this many times their starting norm


def _weight_norm(step: TrainStep) -> float:
    """The L2 norm of all student weights together."""
    with torch.no_grad():
        norms = [p.detach().float().norm() for p in step.model.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(norms)))


def _after_step(run: _Run, step: TrainStep, out: StepOutput, sch: Schedules, prog: _Progress, gen: torch.Generator,
                grad_norm: float | None) -> dict[str, Any] | None:
    """Count a skipped update (stop when they keep coming), log, checkpoint and evaluate on schedule; the
    metrics row when one was logged."""
    cfg, total = run.cfg, len(sch.lr)
    if grad_norm is None:  # non-finite loss: the update was skipped
        prog.skipped, prog.bad_in_a_row = prog.skipped + 1, prog.bad_in_a_row + 1
        if prog.bad_in_a_row > cfg.optim.max_nonfinite_steps:
            where = (f"resume from the last good checkpoint, {prog.last_ckpt}, with --resume and a lower optim.lr "
                     "(or a higher loss.teacher_temp)" if prog.last_ckpt else
                     "no checkpoint was written before it: start over (--overwrite) with a lower optim.lr")
            raise NonFiniteLossError(f"loss is {out.terms['loss'].item()} for {prog.bad_in_a_row} steps in a row "
                                     f"(step {prog.step + 1}): {where}")
    else:
        prog.bad_in_a_row = 0
    prog.step += 1
    row = None
    if prog.step % run.log_every == 0 or prog.step == total:
        row = _log_row(run, step, out, sch, prog, float("nan") if grad_norm is None else grad_norm)
        if run.loggers is not None:
            run.loggers.write(row)  # a resumed run truncates rows past its checkpoint
    end_of_epoch = prog.step % run.steps_per_epoch == 0
    timed = bool(cfg.checkpoint_every_minutes) and time.monotonic() - prog.t_ckpt >= 60 * cfg.checkpoint_every_minutes
    signum = run.stop.received if run.stop is not None else None
    timed, stopping = any_true([timed, signum is not None], run.device)  # every rank: the same step
    due = end_of_epoch or timed or stopping or bool(
        cfg.checkpoint_every_steps and prog.step % cfg.checkpoint_every_steps == 0)
    kept = f"the last good one, {prog.last_ckpt}, is kept" if prog.last_ckpt else "none was written yet"
    if due and prog.bad_in_a_row:  # weights of a non-finite streak never replace (or rotate out) a good one
        log.warning("step %d: no checkpoint while the loss is non-finite (%s)", prog.step, kept)
    elif due and (growth := _weight_norm(step) / prog.weight_norm_ref) > WEIGHT_NORM_LIMIT:  # exploding, finite
        log.warning("step %d: no checkpoint while the weights are %.3g times their starting norm (%s)", prog.step,
                    growth, kept)
    elif due:
        state = _checkpoint_state(run, step, gen, prog)
        if state is not None:
            prog.last_ckpt = save_checkpoint(state, run.dir, prog.step, cfg.keep_checkpoints)
        prog.t_ckpt = time.monotonic()
    if stopping:
        if run.loggers is not None:
            run.loggers.close()
        raise Preempted(signum or signal.SIGTERM, prog.step, prog.last_ckpt)
    for callback in run.evaluation if prog.step < total else ():  # the end has its own evaluations
        every = callback.every(cfg, _moment(run, prog))
        if every and prog.step % max(1, round(every * run.steps_per_epoch)) == 0:
            _tick(prog)
            callback.point(step.teacher.backbone, cfg, _moment(run, prog))
            prog.t_mark, prog.cpu_mark = time.perf_counter(), time.process_time()  # evaluating is not training
    return row


def _moment(run: _Run, prog: _Progress) -> Moment:
    return Moment(prog.step, prog.step / run.steps_per_epoch, prog.train_s, prog.cpu_s, run.folder, run.loggers,
                  run.heldout, run.labelled, run.info.is_main)


def _about(run: _Run, prog: _Progress) -> dict[str, Any]:
    """What the report says about a finished run besides its numbers."""
    import datetime
    from importlib.metadata import version

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"version": version("pwself"), "finished_at": now,
            "device": str(run.device), "world_size": run.info.world_size, "images": len(run.dataset),
            "train_s": round(prog.train_s, 1), "cpu_s": round(prog.cpu_s, 1)}


def _finish(run: _Run, step: TrainStep, prog: _Progress, progress: bool) -> TrainResult:
    """Export the teacher backbone, run the final evaluations the caller gave, mark the run finished."""
    ds = run.dataset
    skipped = getattr(ds, "skipped", None) or getattr(getattr(ds, "dataset", None), "skipped", None)
    if skipped and run.info.is_main:
        log.warning("skipped %d unreadable image(s) (data.on_bad_image=skip), listed above", len(skipped))
    backbone_path = run.folder.backbone
    if run.info.is_main:
        export_backbone(step.teacher.backbone, backbone_path)
    results: dict[str, Any] = {}
    for callback in run.evaluation:
        results.update(callback.final(step.teacher.backbone, run.cfg, _moment(run, prog), progress))
    if run.loggers is not None:
        run.loggers.close()
    knn, floors = results.pop("knn", None), results.pop("floors", None)
    if run.info.is_main:  # last: a run cut off before this point is continued, not shown as done
        write_finished(run.dir, prog.step, knn, floors, {**results, **_about(run, prog)})
    checkpoint = prog.last_ckpt or latest_checkpoint(run.dir) or run.dir
    return TrainResult(run.dir, Path(checkpoint), backbone_path, knn, run.cfg, floors)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
          evaluation: Sequence[EvalCallback] = ()) -> TrainResult:
    """Pretrain a ViT with the configured objective; checkpoint at epoch ends, every ``checkpoint_every_minutes`` and
    when SIGTERM or SIGUSR1 stops the run (:class:`~pwself.runtime.Preempted`); optionally resume.

    Args:
        cfg: The run configuration (validated here, never modified).
        resume: Continue from the newest intact checkpoint in ``cfg.out_dir`` (error if there is none or if the
            saved config differs in a key that changes what is learned, except the divergence fixes
            :data:`~pwself.config.DIVERGENCE_FIX_KEYS`).
        progress: Show a tqdm progress bar.
        overwrite: Start over in a folder that holds another run, moving that run aside (without it, such a
            folder is refused).
        evaluation: What to evaluate, as :class:`EvalCallback` objects; none: nothing
            (:func:`pwself.experiment.pretrain` runs the standard evaluation).

    Returns:
        The run's :class:`TrainResult`.
    """
    run = prepare_run(cfg, resume, overwrite)
    run.evaluation = tuple(evaluation)
    try:
        for callback in run.evaluation:
            callback.start(run.cfg, _moment(run, _Progress()))
        return _train(run, progress)
    finally:
        if run.lock is not None:
            run.lock.release()


def _batches(run: _Run, batches: list[Tensor], epoch: int) -> Iterator[Tensor | MultiCropViews]:
    """The epoch's batches: views cut from the originals (folders), or images in [0, 1] on the device."""
    if run.views is not None:
        yield from run.views.epoch(batches, epoch)
        return
    for images, _ in iterate_batches(run.dataset, batches, run.cfg.data.num_workers):
        yield images.to(run.device, non_blocking=True).float() / 255


def _train(run: _Run, progress: bool) -> TrainResult:
    cfg, info = run.cfg, run.info
    step = build_step(cfg, run.device, cfg.data.mean, cfg.data.std, distributed=info.world_size > 1,
                      load_init=run.ckpt is None)  # a resumed run takes every weight from its checkpoint
    sch = make_schedules(cfg, run.steps_per_epoch, info.world_size)
    run.log_every = log_interval(cfg, len(sch.lr))
    for line in schedule_problems(cfg, run.steps_per_epoch) if info.is_main and run.ckpt is None else ():
        log.warning(line)
    gen = torch.Generator().manual_seed(cfg.seed + 1000003 * info.rank)  # rank 0 = single-process run
    metrics_path = run.folder.metrics
    prog = _Progress()
    if info.is_main:
        run.loggers = MetricLoggers(cfg.log, run.dir, config_to_dict(cfg))
    if run.ckpt is not None:
        prog = _restore(step, run.ckpt, gen, info.rank)
        prog.last_ckpt = Path(run.ckpt["path"])
        if info.is_main:
            _truncate_metrics(metrics_path, prog.step)
    elif metrics_path.exists() and info.is_main:
        metrics_path.unlink()
    total = len(sch.lr)
    bar = tqdm(total=total, initial=prog.step, disable=not progress or not info.is_main,
               desc=f"pretrain {cfg.method}", unit="step")
    prog.weight_norm_ref = float(run.ckpt.get("weight_norm_ref", 0.0)) if run.ckpt else 0.0
    prog.weight_norm_ref = prog.weight_norm_ref or _weight_norm(step)  # older checkpoints: the restored weights'
    prog.t_last = prog.t_mark = time.perf_counter()
    prog.cpu_mark, prog.t_ckpt = time.process_time(), time.monotonic()
    with _StopSignals() as run.stop:
        try:
            _loop(run, step, sch, prog, gen, bar)
        finally:
            bar.close()
    run.stop = None
    return _finish(run, step, prog, progress)


def _loop(run: _Run, step: TrainStep, sch: Schedules, prog: _Progress, gen: torch.Generator, bar: tqdm) -> None:
    """The steps from ``prog.step`` to the end of the schedule."""
    cfg, info, total = run.cfg, run.info, len(sch.lr)
    while prog.step < total:
        epoch, start = divmod(prog.step, run.steps_per_epoch)
        batches = _epoch_batches(len(run.dataset), cfg.batch_size, cfg.seed, epoch, info.rank, info.world_size)
        for batch in _batches(run, batches[start:], epoch):
            apply_schedules(step.optimizer, sch, prog.step)
            out, grad_norm = step(batch, sch.teacher_temp[prog.step], sch.momentum[prog.step], gen)
            prog.images += len(batches[0]) * info.world_size
            row = _after_step(run, step, out, sch, prog, gen, grad_norm)
            bar.update(1)
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", n_match=f"{row['n_match']:.1f}")
            if prog.step >= total:
                break

