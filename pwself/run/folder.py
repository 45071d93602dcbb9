"""The run folder: every file a run writes is named here (:class:`RunFolder`), one run per folder (a new run never
writes over an old one), an exclusive lock while a run writes, and writability checked before any data is read.

No other module spells a run file's name (``tests/test_run_folder.py`` greps for it): they ask a
:class:`RunFolder` for the path, or read and write through it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RunFolder", "RunDirError", "RunInUseError", "holds_run", "holds_weights", "prepare_run_dir", "RunLock",
           "free_space", "move_aside", "check_output", "run_owned", "write_atomic", "RUN_FILES", "RUN_PATTERNS"]

log = logging.getLogger(__name__)


class RunFolder:
    """The files of one run folder, by what they hold. Paths only, and the small JSON records a run keeps; the
    config is read by :func:`pwself.run.state.read_run_config` (it needs the config layer), checkpoints by
    :mod:`pwself.run.checkpoint`.

    Example:
        >>> import pwself
        >>> run = pwself.RunFolder("runs/demo")
        >>> run.config.name, run.checkpoint(300).name, run.score("linear").name
        ('config.yaml', 'checkpoint_00000300.pt', 'score_linear.json')
    """

    CONFIG = "config.yaml"  # the run's settings, written at start (with the derived lr as a trailing comment)
    METRICS = "metrics.jsonl"  # one row per logged step: the source of truth of every curve
    KNN_HISTORY = "knn_history.jsonl"  # in-training kNN points
    DENSE_HISTORY = "dense_history.jsonl"  # in-training dense points
    WANDB_ID = "wandb_id.txt"  # so that a resumed run continues its W&B run
    TENSORBOARD = "tensorboard"  # a folder of TensorBoard event files
    KNN = "knn.json"  # the final kNN
    FLOORS = "floors.json"  # the floors the final kNN is read against
    FINISHED = "finished.json"  # written last by a run that finished (pwself.run.state)
    BACKBONE = "teacher_backbone.safetensors"  # the teacher backbone, timm key names
    CURVES = "training_curves.png"
    REPORT_MD = "report.md"
    REPORT_HTML = "report.html"
    LOCK = ".pwself.lock"
    FLOOR_PREFIX = "floor_"  # floor_<name>.json: a cached floor (random_init, pixels, pixels_dense, start)
    FLOOR_NAMES = ("random_init", "pixels", "pixels_dense", "start")
    # Scores measured after training by compare (score_<protocol>.json) and tune, read back by a rerun
    SCORE_PREFIX = "score_"
    TUNE_SCORE_PREFIX = "tune_score"  # tune_score.json (kNN), tune_score_<metric>.json
    CHECKPOINT_PATTERN = "checkpoint_*.pt"
    NUMBERED_CHECKPOINTS = "checkpoint_[0-9]*.pt"
    CHECKPOINT_LAST = "checkpoint_last.pt"  # a link to the newest checkpoint
    FIGURE_PATTERNS = ("matches_*.png", "attention_*.png")  # the report's numbered figures

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def outputs_line(cls) -> str:
        """What a run writes, in one sentence (``pwself pretrain --help``)."""
        return (f"Outputs in --out-dir: {cls.CONFIG}, {cls.METRICS}, {cls.CHECKPOINT_PATTERN}, {cls.BACKBONE}, "
                f"{cls.KNN}, {cls.FINISHED} (written last: the run finished), {cls.CURVES}, {cls.REPORT_MD}, "
                f"{cls.REPORT_HTML}.")

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    config = property(lambda self: self.path / self.CONFIG)
    metrics = property(lambda self: self.path / self.METRICS)
    knn_history = property(lambda self: self.path / self.KNN_HISTORY)
    dense_history = property(lambda self: self.path / self.DENSE_HISTORY)
    wandb_id = property(lambda self: self.path / self.WANDB_ID)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    knn = property(lambda self: self.path / self.KNN)
    floors = property(lambda self: self.path / self.FLOORS)
    finished = property(lambda self: self.path / self.FINISHED)
    backbone = property(lambda self: self.path / self.BACKBONE)
    curves = property(lambda self: self.path / self.CURVES)
    report_md = property(lambda self: self.path / self.REPORT_MD)
    report_html = property(lambda self: self.path / self.REPORT_HTML)
    lock = property(lambda self: self.path / self.LOCK)
    checkpoint_last = property(lambda self: self.path / self.CHECKPOINT_LAST)

    def floor(self, name: str) -> Path:
        """The cached floor ``name`` (one of :attr:`FLOOR_NAMES`)."""
        assert name in self.FLOOR_NAMES, name
        return self.path / f"{self.FLOOR_PREFIX}{name}.json"

    def score(self, protocol: str) -> Path:
        """What ``protocol`` measured on the run's teacher after training (``compare``), read back by a rerun."""
        return self.path / f"{self.SCORE_PREFIX}{protocol}.json"

    def tune_score(self, metric: str) -> Path:
        """A tuning trial's held-out score of ``metric`` (``knn``: the first, so it keeps its older name)."""
        return self.path / (f"{self.TUNE_SCORE_PREFIX}.json" if metric == "knn"
                            else f"{self.TUNE_SCORE_PREFIX}_{metric}.json")

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint_{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """The numbered checkpoints, oldest first."""
        return sorted(self.path.glob(self.NUMBERED_CHECKPOINTS))

    def figure(self, kind: str, index: int) -> Path:
        """The report's ``index``-th figure of ``kind`` (``matches``, ``attention``)."""
        return self.path / f"{kind}_{index}.png"

    def read_json(self, name: str) -> Any:
        """A JSON record of the run (``RunFolder.KNN``, ``RunFolder.FLOORS``, ...); ``None`` when it is absent."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, name: str, value: Any) -> Path:
        path = self.path / name
        write_atomic(path, json.dumps(value, indent=2))
        return path

    def cached_score(self, protocol: str, compute: Callable[[], Any], key: str | None = None) -> Any:
        """What ``protocol`` measured after training (:meth:`score`): computed once, kept in the folder, read back
        later while it was measured on the same data (``key``, kept in the file as ``data_key``: e.g.
        :func:`pwself.data.dense.dense_key`); a score of other data is measured again."""
        name = self.score(protocol).name
        stored = self.read_json(name)
        if stored is not None and (key is None or stored.get("data_key") == key):
            return stored
        result = compute()
        if key is not None:
            result = {**result, "data_key": key}
        self.write_json(name, result)
        return result

    def scores(self) -> dict[str, Any]:
        """Every protocol's stored score, by protocol name."""
        return {p.name.removeprefix(self.SCORE_PREFIX).removesuffix(".json"): json.loads(p.read_text())
                for p in sorted(self.path.glob(f"{self.SCORE_PREFIX}*.json"))}


# What a run writes before its first checkpoint: removed when a run starts over in a folder holding only these.
UNSTARTED_FILES = (RunFolder.CONFIG, RunFolder.METRICS, RunFolder.KNN_HISTORY, RunFolder.WANDB_ID)
# Every file a run writes into its folder (and RUN_PATTERNS): no other command may replace one.
RUN_FILES = (*UNSTARTED_FILES, RunFolder.FINISHED, RunFolder.KNN, RunFolder.FLOORS,
             *(f"{RunFolder.FLOOR_PREFIX}{n}.json" for n in RunFolder.FLOOR_NAMES), RunFolder.BACKBONE,
             RunFolder.CURVES, RunFolder.DENSE_HISTORY, RunFolder.REPORT_MD, RunFolder.REPORT_HTML, RunFolder.LOCK,
             RunFolder.TENSORBOARD)
# The numbered files of a run
RUN_PATTERNS = (RunFolder.CHECKPOINT_PATTERN, *RunFolder.FIGURE_PATTERNS, f"{RunFolder.SCORE_PREFIX}*.json",
                f"{RunFolder.TUNE_SCORE_PREFIX}*.json")


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
    folder = RunFolder(run_dir)
    return folder.config.exists() or folder.metrics.exists() or any(run_dir.glob(RunFolder.CHECKPOINT_PATTERN))


def holds_weights(run_dir: Path) -> bool:
    """Whether a run folder holds what a restart would lose: a checkpoint or a finished run's result."""
    return any(run_dir.glob(RunFolder.CHECKPOINT_PATTERN)) or RunFolder(run_dir).finished.exists()


def _clear_unstarted(run_dir: Path) -> list[str]:
    """Remove the files of a run that was stopped before its first checkpoint; the names removed."""
    gone = [p for p in (run_dir / n for n in UNSTARTED_FILES) if p.is_file()]
    gone += sorted(RunFolder(run_dir).tensorboard.glob("events.out.tfevents.*"))
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
        if item.name != RunFolder.LOCK:
            item.rename(aside / item.name)
    return aside


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.pwself.lock`` for the life of a run, holding the owner's PID."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunFolder(run_dir).lock
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
