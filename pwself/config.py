"""Run configuration: typed dataclasses, YAML files and ``key=value`` overrides.

A run reads the whole :class:`TrainConfig` where it composes its parts (:func:`pwself.train.train`,
:func:`pwself.step.build_step`, the CLI, ``compare``); each part takes only its own section (``loss``,
``data``, ``views``, ...). The config is saved as ``config.yaml`` beside the checkpoints of every run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pwself.augment import PHOTOMETRIC_MODES, PhotometricConfig
from pwself.data import DATA_KINDS, DataConfig
from pwself.matching import MATCHERS
from pwself.models import PATCH_HEADS, BackboneConfig, HeadConfig
from pwself.objectives import OBJECTIVES
from pwself.objectives.base import LossConfig
from pwself.views import ViewConfig

log = logging.getLogger(__name__)
_CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = [
    "ConfigError",
    "DataConfig",
    "ViewConfig",
    "LossConfig",
    "OptimConfig",
    "LogConfig",
    "TrainConfig",
    "load_config",
    "resolve_config",
    "shipped_configs",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "config_diff",
    "save_config",
    "field_docs",
    "describe_config",
]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the fix."""


@dataclass
class OptimConfig:
    """AdamW with cosine schedules (DINO's recipe; ``lr`` is for a batch of 256, scaled linearly).

    Attributes:
        lr: Peak learning rate for batch 256.
        min_lr: Final learning rate.
        warmup_epochs: Linear lr warm-up.
        weight_decay: Weight decay at the start (cosine to ``weight_decay_end``).
        weight_decay_end: Weight decay at the end.
        clip_grad: Max gradient norm (0: off).
        freeze_last_layer_epochs: Epochs during which the head's last layer does not learn.
        momentum_teacher: EMA momentum at the start (cosine to 1).
        max_nonfinite_steps: Non-finite losses in a row that are skipped before the run stops.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1.0
    momentum_teacher: float = 0.996
    max_nonfinite_steps: int = 5


@dataclass
class LogConfig:
    """Where the metrics go besides ``metrics.jsonl`` (always written: the source of truth).

    Attributes:
        tensorboard: Also write TensorBoard event files to ``OUT_DIR/tensorboard`` (extra ``[tensorboard]``).
        wandb: Weights & Biases project to log to, empty for none (extra ``[wandb]``; ``WANDB_MODE=offline``
            is honoured).
    """

    tensorboard: bool = False
    wandb: str = ""


@dataclass
class TrainConfig:
    """Everything that defines a pretraining run.

    Attributes:
        data: Where the images come from.
        views: Multi-crop views.
        photometric: Photometric augmentation.
        backbone: The ViT.
        head: The DINO projection head.
        loss: Objective and temperatures.
        optim: Optimizer and schedules.
        log: Metric sinks besides metrics.jsonl.
        epochs: Passes over the training data (sets the length of every schedule).
        batch_size: Images per step and process.
        seed: Seed of the whole run (init, views, augmentation, data order).
        out_dir: Run directory (config, metrics, checkpoints, exports, report).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``fp32``, ``bf16`` (CPU or CUDA), ``fp16`` (CUDA, with a gradient scaler) or ``fp64``
            (float64 weights and arithmetic: slow, for numerical checks; its results agree across CPUs).
        log_every: Steps between metric rows.
        checkpoint_every_steps: Extra checkpoints every N steps (0: at epoch ends only).
        keep_checkpoints: Newest checkpoints kept (0: all).
        knn_at_end: Evaluate kNN on the held-out split when training ends.
        knn_every_epochs: Also evaluate kNN every N epochs during training (0: never; 0.5: twice an epoch);
            each row of ``knn_history.jsonl`` carries the training seconds so far (evaluation excluded).
        knn_floors: Beside the final kNN, the same protocol on a random init of the backbone and on raw
            pixels (when small enough): the numbers that give the result meaning.
    """

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    out_dir: str = "runs/pwself"
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    knn_at_end: bool = True
    knn_every_epochs: float = 0
    knn_floors: bool = True

    def _get(self, key: str) -> Any:
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def validate(self) -> None:
        """Check every value's range and the cross-field constraints; raise :class:`ConfigError` naming the
        key, the value and what is allowed."""
        for key, (check, allowed) in _RANGES.items():
            value = self._get(key)
            if isinstance(value, float) and not math.isfinite(value) or not check(value):
                raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"optim.min_lr={self.optim.min_lr} is above optim.lr={self.optim.lr}: the schedule ends "
                              "at min_lr, so it must be at most lr")
        lo, hi = self.photometric.blur_sigma
        if not 0 < lo <= hi:
            raise ConfigError(f"photometric.blur_sigma={[lo, hi]} must be [low, high] with 0 < low <= high")
        for key in ("views.global_scale", "views.local_scale"):
            lo, hi = self._get(key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{key}={[lo, hi]} must be [low, high] with 0 < low <= high <= 1")
        p, v = self.backbone.patch_size, self.views
        for name, size in (("views.global_size", v.global_size), ("views.local_size", v.local_size)):
            if size % p:
                raise ConfigError(f"{name}={size} is not a multiple of the patch size {p}: use a multiple of {p}")
            if size < p:
                raise ConfigError(f"{name}={size} is smaller than the patch size {p}")
        if v.n_local and v.local_size >= v.global_size:
            raise ConfigError(
                f"views.local_size={v.local_size} must be smaller than views.global_size={v.global_size}"
            )
        if v.n_global < 1 or v.n_global + v.n_local < 2:
            raise ConfigError("need at least 1 global view and 2 views in total (views.n_global, views.n_local)")
        if self.loss.objective not in OBJECTIVES:
            raise ConfigError(f"loss.objective={self.loss.objective!r}: use one of {', '.join(OBJECTIVES)}")
        problem = OBJECTIVES[self.loss.objective].config_problem(self.views, self.head)
        if problem:
            raise ConfigError(f"loss.objective={self.loss.objective}: {problem}")
        _choice("loss.matcher", self.loss.matcher, MATCHERS)
        _choice("head.patch_head", self.head.patch_head, PATCH_HEADS)
        if self.head.patch_head == "shared" and self.head.patch_out_dim not in (0, self.head.out_dim):
            raise ConfigError(f"head.patch_out_dim={self.head.patch_out_dim} needs a patch head of its own: set "
                              "head.patch_head=separate or split")
        if not 0.0 <= self.loss.lam <= 1.0:
            raise ConfigError(f"loss.lam={self.loss.lam} is outside [0, 1]: it is the CLS weight of the loss")
        if not 0.0 < self.loss.patch_fraction <= 1.0:
            raise ConfigError(f"loss.patch_fraction={self.loss.patch_fraction} must be in (0, 1]")
        _choice("photometric.mode", self.photometric.mode, PHOTOMETRIC_MODES)
        _choice("data.kind", self.data.kind, DATA_KINDS)
        if self.data.max_side < -1 or 0 < self.data.max_side < v.global_size:
            raise ConfigError(f"data.max_side={self.data.max_side} must be -1 (derived from the views), 0 (never "
                              f"shrink) or at least views.global_size={v.global_size}")
        if self.data.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"data.on_bad_image={self.data.on_bad_image!r}: use fail or skip")
        if self.precision not in ("fp32", "bf16", "fp16", "fp64"):
            raise ConfigError(f"precision={self.precision!r}: use fp32, bf16 (CPU or CUDA), fp16 (CUDA) or fp64")
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs must be at least 1")
        if self.backbone.embed_dim % self.backbone.num_heads:
            raise ConfigError(
                f"backbone.embed_dim={self.backbone.embed_dim} is not divisible by num_heads={self.backbone.num_heads}"
            )


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse a value outside its registry, naming the choices (which the owning module lists)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


def _fraction(x: float) -> bool:
    return 0 <= x <= 1


_POS, _NONNEG, _FRAC = (_positive, "> 0"), (_non_negative, ">= 0"), (_fraction, "in [0, 1]")
# Value ranges checked by TrainConfig.validate (finiteness too, for floats).
_RANGES: dict[str, tuple[Any, str]] = {
    **{k: _POS for k in ("optim.lr", "loss.teacher_temp", "loss.warmup_teacher_temp", "loss.student_temp",
                         "backbone.patch_size", "backbone.num_heads", "backbone.embed_dim", "backbone.depth",
                         "backbone.mlp_ratio", "backbone.in_chans", "head.out_dim", "head.hidden_dim",
                         "head.bottleneck_dim", "head.n_layers", "data.image_size", "data.synthetic_size",
                         "data.synthetic_classes", "log_every", "batch_size", "epochs", "views.global_size",
                         "views.local_size")},
    **{k: _NONNEG for k in ("optim.min_lr", "optim.clip_grad", "optim.weight_decay", "optim.weight_decay_end",
                            "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "optim.max_nonfinite_steps",
                            "loss.warmup_teacher_temp_epochs", "loss.logo_weight", "loss.cossl_weight",
                            "views.n_local", "data.subset", "data.num_workers", "checkpoint_every_steps",
                            "keep_checkpoints", "knn_every_epochs", "head.patch_out_dim")},
    **{k: _FRAC for k in ("loss.center_momentum", "optim.momentum_teacher", "views.flip_p", "loss.lam",
                          "photometric.jitter_p", "photometric.grayscale_p", "photometric.blur_p",
                          "photometric.solarize_p", "photometric.noise_p")},
    "backbone.drop_path_rate": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "loss.patch_fraction": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "views.n_global": (lambda x: x >= 1, ">= 1"),
}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return config_from_dict(value, tp, prefix=key + ".")
    if origin in (tuple,):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin in (list,):
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(arg, v, key) for v in value]
    if origin in (typing.Union, types.UnionType) or origin is typing.Literal:
        return value
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


# Keys of earlier versions, dropped when read (saved configs of old runs still load): why each went.
REMOVED_KEYS = {
    "backbone.img_size": "the backbone's input size is views.global_size",
    "data.channels": "images are read with backbone.in_chans channels",
}


def config_from_dict(d: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    removed = {k for k in d if prefix + k in REMOVED_KEYS}
    for k in sorted(removed):
        log.info("config key %s%s is ignored: %s", prefix, k, REMOVED_KEYS[prefix + k])
    d = {k: v for k, v in d.items() if k not in removed}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
            f"valid here: {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in d.items()})


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` overrides (values parsed as YAML: ``1e-3``, ``[0.4, 1.0]``, ``true``)."""
    d = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {part!r} in {key!r}")
            node = node[part]
        if key.strip() in REMOVED_KEYS:
            raise ConfigError(f"{key.strip()} is no longer a key: {REMOVED_KEYS[key.strip()]}")
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}; valid here: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return config_from_dict(d)


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``pwself/configs/NAME.yaml``)."""
    return sorted(p.name.removesuffix(".yaml") for p in _CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML file: the path if it exists, else the shipped config of that name (``fmnist_demo``, or an old
    ``configs/fmnist_demo.yaml`` path from a checkout)."""
    path = Path(os.path.expandvars(os.path.expanduser(str(name_or_path))))
    if path.is_dir():
        raise ConfigError(f"--config {name_or_path} is a folder: pass a YAML file or a shipped config name "
                          f"({', '.join(shipped_configs())})")
    if path.is_file():
        return path
    shipped = _CONFIG_DIR / (path.name.removesuffix(".yaml").removesuffix(".yml") + ".yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config {name_or_path} does not exist: pass a YAML file or a shipped config name "
                      f"({', '.join(shipped_configs())})")


def apply_backbone_name(cfg: TrainConfig) -> TrainConfig:
    """Fill the backbone's size keys from ``backbone.name`` (when set), saying so."""
    if cfg.backbone.name:
        from pwself.models import named_architecture

        try:
            sizes = named_architecture(cfg.backbone.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        changed = {k: v for k, v in sizes.items() if getattr(cfg.backbone, k) != v}
        for k, v in sizes.items():
            setattr(cfg.backbone, k, v)
        if changed:
            sets = " ".join(f"backbone.{k}={v}" for k, v in changed.items())
            log.info("backbone.name=%s sets %s", cfg.backbone.name, sets)
    return cfg


def resolve_max_side(cfg: TrainConfig) -> TrainConfig:
    """Replace ``data.max_side=-1`` by the bound its views need (:func:`pwself.data.photos.auto_max_side`);
    0 for data that is not a folder (nothing to shrink)."""
    if cfg.data.kind != "folder":
        cfg.data.max_side = 0
    elif cfg.data.max_side == -1:
        from pwself.data.photos import auto_max_side

        v = cfg.views
        kinds = [(v.global_size, v.global_scale[0])] + ([(v.local_size, v.local_scale[0])] if v.n_local else [])
        cfg.data.max_side = auto_max_side(kinds)
    return cfg


def saved_config(d: dict[str, Any]) -> TrainConfig:
    """The config a run saved (``config.yaml`` or a checkpoint's), read as that run meant it: runs written before
    ``data.max_side`` existed cut their views from the originals (0)."""
    d = {**d, "data": {"max_side": 0, **(d.get("data") or {})}}
    return config_from_dict(d)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file (a path or a shipped config name) <- overrides, validated."""
    cfg = TrainConfig()
    if path is not None:
        path = resolve_config(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config file {path} is not valid YAML{where} ({problem}): fix that line") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        cfg = config_from_dict(d)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = apply_backbone_name(cfg)
    cfg.validate()
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


# Keys that may change between a checkpoint and its resumption without changing what is learned. `epochs` is
# not one: it sets the length of every cosine schedule, so a resumed run with other epochs would not continue
# the run it resumes (train a new run instead).
RESUME_FREE_KEYS = ("out_dir", "device", "log_every", "checkpoint_every_steps", "keep_checkpoints", "knn_at_end",
                    "knn_every_epochs", "data.num_workers", "data.root", "data.on_bad_image",
                    "optim.max_nonfinite_steps", "loss.recompute_head", "knn_floors", "log.tensorboard",
                    "log.wandb")


# Keys a resume may change when the user gives them explicitly, to recover from a divergence (the run says so).
DIVERGENCE_FIX_KEYS = ("optim.lr", "optim.min_lr", "optim.clip_grad", "loss.teacher_temp", "loss.warmup_teacher_temp")


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring :data:`RESUME_FREE_KEYS`)."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = prefix + k
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb and key not in RESUME_FREE_KEYS:
            out.append(key)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """One-line description of every field of a config dataclass, from its docstring's ``Attributes:``."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, name, first_indent = False, None, 0
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside or not stripped:
            continue
        head, sep, rest = stripped.partition(": ")
        indent = len(line) - len(line.lstrip())
        if sep and head.isidentifier() and (name is None or indent <= first_indent):
            name, first_indent = head, indent
            docs[name] = rest
        elif name is not None:
            docs[name] += " " + stripped
    # One line each: the first sentence.
    return {k: re.split(r"(?<=\.)\s+(?=[A-Z0-9])", v.replace("``", "`"))[0] for k, v in docs.items()}


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]


def describe_config(cfg: TrainConfig) -> str:
    """Every key of a config with its value and a one-line description, as YAML a user can save and edit."""
    out = ["# pwself config: every key, its value and what it means. Save it, edit it, pass it with --config FILE.",
           "# Any key can also be set on the command line: KEY=VALUE, e.g. optim.lr=1e-3 views.n_local=8."]

    def walk(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value, doc = getattr(obj, f.name), docs.get(f.name, "")
            comment = f"  # {doc}" if doc else ""
            if dataclasses.is_dataclass(value):
                out.append(f"{indent}{f.name}:{comment}")
                walk(value, indent + "  ")
            else:
                out.append(f"{indent}{f.name}: {_yaml_scalar(config_to_dict(value))}{comment}")

    walk(cfg, "")
    return "\n".join(out) + "\n"
