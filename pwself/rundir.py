"""Run folders: one run per folder (a new run never writes over an old one), an exclusive lock while a run
writes, and writability checked before any data is read."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RunDirError", "RunInUseError", "holds_run", "holds_weights", "prepare_run_dir", "RunLock", "free_space",
           "FINISHED_FILE", "move_aside", "check_output", "run_owned", "write_atomic"]

log = logging.getLogger(__name__)

LOCK_NAME = ".pwself.lock"
FINISHED_FILE = "finished.json"  # written last by a run that finished (pwself.runstate)
# What a run writes before its first checkpoint: removed when a run starts over in a folder holding only these.
UNSTARTED_FILES = ("config.yaml", "metrics.jsonl", "knn_history.jsonl", "wandb_id.txt")
# Every file a run writes into its folder (and RUN_PATTERNS): no other command may replace one.
RUN_FILES = (*UNSTARTED_FILES, FINISHED_FILE, "knn.json", "floors.json", "floor_random_init.json",
             "floor_pixels.json", "floor_start.json", "teacher_backbone.safetensors", "training_curves.png",
             "dense_history.jsonl", "report.md", "report.html", LOCK_NAME)
RUN_PATTERNS = ("checkpoint_*.pt", "matches_*.png", "attention_*.png")  # the numbered files of a run


class RunDirError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


class RunInUseError(RunDirError):
    """The run folder is locked by another running pwself process."""


def free_space(path: Path) -> str:
    """Free space of the filesystem holding ``path``, human-readable ('?' when unknown)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "?"


def holds_run(run_dir: Path) -> bool:
    """Whether a folder already holds (part of) a pwself run."""
    if not run_dir.is_dir():
        return False
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or any(run_dir.glob("checkpoint_*.pt"))


def holds_weights(run_dir: Path) -> bool:
    """Whether a run folder holds what a restart would lose: a checkpoint or a finished run's result."""
    return any(run_dir.glob("checkpoint_*.pt")) or (run_dir / FINISHED_FILE).exists()


def _clear_unstarted(run_dir: Path) -> list[str]:
    """Remove the files of a run that was stopped before its first checkpoint; the names removed."""
    gone = [p for p in (run_dir / n for n in UNSTARTED_FILES) if p.is_file()]
    gone += sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for p in gone:
        p.unlink()
    return [str(p.relative_to(run_dir)) for p in gone]


def run_owned(path: Path) -> bool:
    """Whether ``path`` is one of the files of the run in its folder (which only that run may write)."""
    path = Path(path)
    return holds_run(path.parent) and (path.name in RUN_FILES or any(path.match(p) for p in RUN_PATTERNS))


def check_output(path: Path, overwrite: bool, inputs: tuple[Path, ...] = (), what: str = "output") -> None:
    """Refuse, in one line, to write ``path`` onto a run's own files or onto an input, or onto an existing file
    without ``overwrite``."""
    path = Path(path)
    for src in inputs:
        if path.exists() and Path(src).exists() and path.resolve() == Path(src).resolve():
            raise RunDirError(f"{what} {path} is the input itself: choose another path")
    if run_owned(path):
        raise RunDirError(f"{what} {path} would replace a file of the run in {path.parent}: choose a path outside "
                          "the run's own files")
    if path.exists() and not overwrite:
        raise RunDirError(f"{what} {path} exists: choose another path or pass --overwrite to replace it")


def _aside_path(folder: Path) -> Path:
    """The sibling ``NAME.replaced-TIME`` where a folder's old contents go (never deleted)."""
    return folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")


def move_aside(folder: Path) -> Path:
    """Move a whole folder to :func:`_aside_path`; the new place."""
    aside = _aside_path(folder)
    folder.rename(aside)
    return aside


def _move_aside(run_dir: Path) -> Path:
    """Move everything of the old run (all but the lock) into :func:`_aside_path`."""
    aside = _aside_path(run_dir)
    aside.mkdir()
    for item in run_dir.iterdir():
        if item.name != LOCK_NAME:
            item.rename(aside / item.name)
    return aside


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.pwself.lock`` for the life of a run, holding the owner's PID."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(f"{self.path.parent} is in use by another pwself run (PID {holder}): wait for it to "
                              "finish or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> tuple[RunLock, Path | None]:
    """Create and lock the run folder; refuse one that holds another run unless resuming it or ``overwrite``
    (which moves the old run aside, never deletes it). A run stopped before its first checkpoint has nothing
    to lose: a new run starts over in its folder. Returns the lock and where an old run was moved."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out-dir {run_dir} is a file, not a folder: choose another --out-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --out-dir {run_dir} ({e.strerror}): choose a writable folder") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"--out-dir {run_dir} is not writable: choose a writable folder")
    lock = RunLock(run_dir)
    lock.acquire()
    moved = None
    if holds_run(run_dir) and not resume and not holds_weights(run_dir) and not overwrite:
        log.warning("%s holds a run stopped before its first checkpoint: starting over (removed %s)", run_dir,
                    ", ".join(_clear_unstarted(run_dir)))
    if holds_run(run_dir) and not resume:
        if not overwrite:
            lock.release()
            raise RunDirError(f"{run_dir} already holds a run: continue it with --resume, start over with "
                              "--overwrite (the old run is moved aside, not deleted), or choose another --out-dir")
        moved = _move_aside(run_dir)
    return lock, moved


def write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    """Write a file through a temporary one beside it: a full disk leaves no empty or torn file, and the error
    names the file. ``content``: the text, or a function that writes the file at the path it is given."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
