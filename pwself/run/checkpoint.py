"""Atomic, safe checkpoints: ``torch.save`` to a temp file then rename; loaded with ``weights_only=True``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from pwself.config import DIVERGENCE_FIX_KEYS, config_diff, config_from_dict, config_to_dict
from pwself.run.folder import RunFolder, free_space

if TYPE_CHECKING:
    from pwself.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "resume_checkpoint", "checkpoint_record", "progress_of", "teacher_weights",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "upgrade_checkpoint", "config_of_checkpoint",
           "export_backbone"]



class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


CHECKPOINT_FORMAT = 2  # objectives own their state (format 1 kept the centers under `criterion`)


def checkpoint_record(parts: dict[str, Any], config: dict[str, Any], *, step: int, skipped: int, train_s: float,
                      cpu_s: float, epoch: int, world_size: int, rngs: tuple[list, list, list],
                      dataset: dict[str, Any] | None, weight_norm_ref: float) -> dict[str, Any]:
    """The layout of a checkpoint: the step's states (``parts``: student, teacher, objective, optimizer, scaler,
    anchor), every rank's generators (``rngs``: pwself's, torch's, the host's), the counters, the run's config and
    the identity of its data (checked on resume)."""
    generators, torch_rngs, host_rngs = rngs
    return {**parts, "skipped_steps": skipped, "generators": generators, "torch_rngs": torch_rngs,
            "host_rngs": host_rngs, "step": step, "train_s": train_s, "cpu_s": cpu_s, "epoch": epoch,
            "config": config, "world_size": world_size, "format": CHECKPOINT_FORMAT, "dataset": dataset,
            "weight_norm_ref": weight_norm_ref}


def progress_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The counters a resumed run continues from (older checkpoints without timing: 0)."""
    return {"step": int(ckpt["step"]), "skipped": int(ckpt.get("skipped_steps", 0)),
            "train_s": float(ckpt.get("train_s", 0.0)), "cpu_s": float(ckpt.get("cpu_s", 0.0))}


def teacher_weights(ckpt: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The teacher's weights of a checkpoint whose names start with ``prefix``, without it (``backbone.``: the
    backbone with timm's names)."""
    return {k[len(prefix):]: v for k, v in ckpt["teacher"].items() if k.startswith(prefix)}


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``checkpoint_{step:08d}.pt`` atomically, point ``checkpoint_last.pt`` at it, keep the last ``keep``.

    A crash mid-write leaves the previous checkpoints untouched: the new file only appears by rename. A failed
    write (a full disk) removes its partial file and raises :class:`CheckpointError` naming the folder and
    its free space.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    path = folder.checkpoint(step)
    tmp = path.with_suffix(".pt.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch reports a full disk as either, depending on where it fails
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path.name} in {run_dir} ({_reason(e)}; {free_space(run_dir)} "
                              "free): free some space or choose another --out-dir; earlier checkpoints are intact, "
                              "continue with --resume") from None
    tmp.replace(path)
    last_tmp = folder.checkpoint_last.with_suffix(".pt.tmp")
    if last_tmp.exists() or last_tmp.is_symlink():
        last_tmp.unlink()
    os.symlink(path.name, last_tmp)
    last_tmp.replace(folder.checkpoint_last)
    if keep > 0:
        for old in folder.checkpoints()[:-keep]:
            old.unlink()
    return path


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0][:120] or type(e).__name__


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``None``."""
    folder = RunFolder(run_dir)
    if folder.checkpoint_last.exists():
        return folder.checkpoint_last.resolve()
    found = folder.checkpoints()
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}: train first (pwself pretrain) or pass a .pt file")
        path = found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files and foreign pickles fail in many ways
        raise CheckpointError(
            f"cannot load checkpoint {path} ({type(e).__name__}): it is corrupt or not a pwself checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or not {"config", "teacher", "step"} <= set(ckpt):
        raise CheckpointError(f"{path} loads but is not a pwself checkpoint (no config/teacher/step): pass a "
                              "checkpoint_*.pt or run folder of pwself pretrain")
    return ckpt


def upgrade_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint written before objectives owned their state (format 1) to the current layout.

    Format 1 kept the centers under ``criterion`` and LoGo's affinity network inside the student (and a copy
    in the teacher); format 2 keeps both in ``objective``, where LoGo's network is ``local_terms.affinity``.
    """
    if "objective" in ckpt or "criterion" not in ckpt:
        return ckpt
    ckpt = dict(ckpt)
    objective = dict(ckpt.pop("criterion"))  # every objective had a patch center then, used or not
    for part in ("student", "teacher"):
        weights = dict(ckpt[part])
        for key in [k for k in weights if k.startswith("affinity.")]:
            value = weights.pop(key)
            if part == "student":
                objective["local_terms." + key] = value
        ckpt[part] = weights
    ckpt["objective"], ckpt["format"] = objective, 1
    return ckpt


def saved_config(d: dict[str, Any]) -> TrainConfig:
    """The config a run saved (``config.yaml`` or a checkpoint's), read as that run meant it: runs written before
    ``data.max_side`` existed cut their views from the originals (0); renamed keys are read under their new
    names (:data:`pwself.config.RENAMED_KEYS`)."""
    d = {**d, "data": {"max_side": 0, **(d.get("data") or {})}}
    return config_from_dict(d)


def config_of_checkpoint(ckpt: dict[str, Any]) -> TrainConfig:
    """The :class:`~pwself.config.TrainConfig` stored in a checkpoint, as its run meant it."""
    return saved_config(ckpt["config"])


def export_backbone(backbone: nn.Module, path: str | Path) -> Path:
    """Save backbone weights with timm key names as safetensors (loadable by ``timm.create_model``)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any other file the run writes (safetensors creates it 0600)
    tmp.replace(path)
    return path


def _newest_intact_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that loads; a corrupt newer one is named and passed over."""
    found = RunFolder(run_dir).checkpoints()[::-1]
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir}; start without --resume")
    for k, path in enumerate(found):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            if k == len(found) - 1:
                raise CheckpointError(f"--resume: no checkpoint in {run_dir} loads (the oldest: {e}); start over "
                                      "with --overwrite") from None
            log.warning("%s; resuming from the previous checkpoint, %s", e, found[k + 1].name)
            continue
        return path, ckpt
    raise AssertionError("unreachable")


def _check_same_data(found: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume on other training data (a new schedule length, other images): name what changed."""
    if not saved:  # checkpoints written before the data was recorded
        return
    if saved["images"] != now["images"]:
        raise CheckpointError(f"cannot resume {found}: the training data now has {now['images']} images, the run had "
                              f"{saved['images']} (data.root={now['root']}): resume on the same data, or start a new "
                              "run")
    if saved["fingerprint"] != now["fingerprint"]:
        raise CheckpointError(f"cannot resume {found}: the training images or labels under data.root={now['root']} "
                              "changed since the run started (same count, other files, sizes, dates or classes): "
                              "restore them, or start a new run")
    if saved["root"] != now["root"]:
        log.info("resuming on the same images at data.root=%s (the run had %s)", now["root"], saved["root"])


def resume_checkpoint(cfg: TrainConfig, run_dir: Path, world_size: int, data_id: dict[str, Any]) -> dict[str, Any]:
    """The newest intact checkpoint of ``run_dir`` (upgraded), checked against this run: the same number of
    processes, the same data (``data_id``), the same config but the divergence fixes the user gives
    (:data:`pwself.config.DIVERGENCE_FIX_KEYS`, in their safe direction, said in a line); fills in ``cfg``'s channel
    statistics from it."""
    found, ckpt = _newest_intact_checkpoint(run_dir)
    ckpt = upgrade_checkpoint(ckpt)
    ckpt["path"] = str(found)
    if len(ckpt["generators"]) != world_size:
        raise CheckpointError(f"cannot resume {found}: it was written by {len(ckpt['generators'])} process(es), this "
                              f"run has {world_size}; resume with the same number of processes")
    saved = config_to_dict(config_of_checkpoint(ckpt))
    if not cfg.data.mean and saved["data"]["mean"]:
        cfg.data.mean, cfg.data.std = list(saved["data"]["mean"]), list(saved["data"]["std"])
    diff = config_diff(saved, config_to_dict(cfg))
    refused = [k for k in diff if k not in DIVERGENCE_FIX_KEYS]
    if refused:
        raise CheckpointError(f"cannot resume {found}: config differs in {', '.join(refused)}; use the saved "
                              f"{RunFolder(run_dir).config} or a new out_dir")
    now = config_to_dict(cfg)
    for key in diff:  # a divergence fix the user asked for: allowed in its safe direction, and said
        a, b = key.split(".")
        lower = key in ("optim.lr", "optim.min_lr", "optim.clip_grad")
        if (now[a][b] > saved[a][b]) == lower or (key == "optim.clip_grad" and now[a][b] == 0):
            raise CheckpointError(f"cannot resume {found} with {key}={now[a][b]} (the run had {saved[a][b]}): a resume "
                                  f"may only {'lower' if lower else 'raise'} it to recover from a divergence"
                                  f"{' (and keep clipping on)' if key == 'optim.clip_grad' else ''}; start a new run "
                                  "for other settings")
        log.warning("resuming with %s=%s (the checkpoint's run had %s): the schedules from step %d use it",
                    key, now[a][b], saved[a][b], int(ckpt["step"]))
    _check_same_data(found, ckpt.get("dataset"), data_id)
    return ckpt
