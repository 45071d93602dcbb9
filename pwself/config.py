"""Run configuration: typed dataclasses, YAML files and ``key=value`` overrides.

A run reads the whole :class:`TrainConfig` where it composes its parts (:func:`pwself.train.train`,
:func:`pwself.step.build_step`, the CLI, ``compare``); each part takes only its own section (``loss``,
``data``, ``views``, ...). The config is saved as ``config.yaml`` beside the checkpoints of every run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pwself.augment import PhotometricConfig
from pwself.data import DataConfig
from pwself.eval.during import EvalConfig
from pwself.loggers import LogConfig
from pwself.models import BackboneConfig, HeadConfig
from pwself.objectives import check_objective, options_section
from pwself.objectives.base import LossConfig
from pwself.sections import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, check_choice, check_ranges, field_help
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
    "describe_config",
    "rename_keys",
    "run_config",
]


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
        head_warmup_epochs: Epochs (fractions allowed) at the start during which only the heads (and iBOT's mask
            token) learn and the backbone stays exactly as loaded; the teacher's heads follow the student's. For
            a started backbone (``backbone.init``) with new heads: without it, the random heads' gradients reach
            the backbone from the first step.
        layer_decay: Layer-wise lr decay (BEiT, dinov2 fine-tuning): block ``i`` of ``depth`` learns at
            ``lr * layer_decay ** (depth - i)``, the embeddings at ``layer_decay ** (depth + 1)``, the final norm
            and the heads at ``lr`` (1: off).
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
    head_warmup_epochs: float = 0.0
    layer_decay: float = 1.0

    def validate(self) -> None:
        check_ranges(self, "optim", {"lr": POSITIVE, "momentum_teacher": FRACTION,
                                     "layer_decay": (lambda x: 0 < x <= 1, "in (0, 1] (1: off)"),
                                     **{k: NON_NEGATIVE for k in ("min_lr", "clip_grad", "weight_decay",
                                                                  "weight_decay_end", "warmup_epochs",
                                                                  "freeze_last_layer_epochs", "max_nonfinite_steps",
                                                                  "head_warmup_epochs")}})
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}: the schedule ends "
                              "at min_lr, so it must be at most lr")


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
        eval: What the run evaluates while it trains and when it ends (kNN, floors, the dense probe).
        objectives: Each objective's own knobs (``objectives.logo.weight``, ...), declared in its module.
        epochs: Passes over the training data (sets the length of every schedule).
        steps: Optimizer steps of the run (0: ``epochs`` passes); set, it is the length of every schedule, and
            the ``*_epochs`` settings are still read in epochs of the data.
        batch_size: Images per step and process.
        seed: Seed of the whole run (init, views, augmentation, data order).
        out_dir: Run directory (config, metrics, checkpoints, exports, report).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``fp32``, ``bf16`` (CPU or CUDA), ``fp16`` (CUDA, with a gradient scaler) or ``fp64``
            (float64 weights and arithmetic: slow, for numerical checks; its results agree across CPUs).
        log_every: Steps between metric rows.
        checkpoint_every_steps: Extra checkpoints every N steps (0: at epoch ends only).
        checkpoint_every_minutes: Also a checkpoint when this many minutes passed since the last one (0: off), so
            that a preemption or a crash loses minutes, not an epoch. SIGTERM and SIGUSR1 always end the step in
            progress, write a checkpoint and stop (exit 128 + the signal); ``--auto-resume`` continues exactly.
        keep_checkpoints: Newest checkpoints kept (0: all).
        recipe: The recipe (``--objective dinov2``) that set the loss keys, as its user named it: shown by the
            progress bar, the report and the model card (a record: the keys themselves decide the run).
    """

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objectives: Any = field(default_factory=lambda: options_section()())
    epochs: int = 10
    steps: int = 0
    batch_size: int = 64
    seed: int = 0
    out_dir: str = "runs/pwself"
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0
    keep_checkpoints: int = 2
    recipe: str = ""

    @property
    def method(self) -> str:
        """The name of what trains: the recipe the user chose, else the objective."""
        return self.recipe or self.loss.objective

    def validate(self) -> None:
        """Check every section (each checks itself: :mod:`pwself.sections`) and the run's own keys; raise
        :class:`ConfigError` naming the key, the value and what is allowed."""
        self.backbone.validate()  # first: the views are checked against its patch size
        self.head.validate()
        self.views.validate(self.backbone.patch_size)
        self.data.validate(self.views.global_size)
        self.photometric.validate()
        self.loss.validate()
        check_objective(self.loss, self.views, self.head, self.objectives)
        self.optim.validate()
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16", "fp64"))
        if self.recipe:
            from pwself.objectives import RECIPES

            check_choice("recipe", self.recipe, tuple(RECIPES))
        check_ranges(self, "", {**{k: POSITIVE for k in ("log_every", "batch_size", "epochs")},
                                   **{k: NON_NEGATIVE for k in ("steps", "checkpoint_every_steps",
                                                                "checkpoint_every_minutes",
                                                                "keep_checkpoints")}})
        if self.loss.gram_weight and not self.backbone.init:
            raise ConfigError(f"loss.gram_weight={self.loss.gram_weight} anchors to the starting model: set "
                              "backbone.init=FILE (a released or pretrained backbone), or loss.gram_weight=0")
        self.eval.validate()


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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping such as {{embed_dim: 96, depth: 2}}, got {value!r}")
        return dict(value)
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
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        word = "a number" if tp is float else tp.__name__
        raise ConfigError(f"{key} must be {word}, got {value!r}")
    return value


# Keys of earlier versions, dropped when read (saved configs of old runs still load): why each went.
REMOVED_KEYS = {
    "backbone.img_size": "the backbone's input size is views.global_size",
    "data.channels": "images are read with backbone.in_chans channels",
}
# Keys of earlier versions and their names now: read under the new name (files), accepted with a note (overrides).
RENAMED_KEYS = {
    "loss.logo_weight": "objectives.logo.weight",  # an objective's own knobs live in its own module
    "loss.cossl_weight": "objectives.cossl.weight",
    **{key: f"eval.{key}" for key in ("knn_at_end", "knn_every_epochs", "knn_floors", "dense_every_epochs",
                                      "dense_data")},  # evaluation settings have a section of their own
}


def rename_keys(d: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """A copy of a nested config dict with :data:`RENAMED_KEYS` moved to their new places, each said in a line
    (not when ``quiet``: reading an old run's file for display)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in RENAMED_KEYS.items():
        section, _, key = old.rpartition(".")
        holder = d.get(section) if section else d
        if isinstance(holder, dict) and key in holder:
            value = holder.pop(key)
            node = d
            for part in new.split(".")[:-1]:
                node[part] = node = dict(node.get(part) or {})
            node[new.rsplit(".", 1)[1]] = value
            if not quiet:
                log.info("config key %s is now %s", old, new)
    return d


def _section_types(cls: type) -> dict[str, Any]:
    """Field types of a config dataclass; the ``objectives`` section is built from the objective registry."""
    hints = typing.get_type_hints(cls)
    if cls is TrainConfig:
        hints["objectives"] = options_section()
    return hints


def config_from_dict(d: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    if cls is TrainConfig:
        d = rename_keys(d)
    hints = _section_types(cls)
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


def split_choices(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]``: a comma list whose ``[..]`` values keep their commas (tune's
    value grids, compare's objective labels), items stripped, empty ones dropped."""
    return [v.strip() for v in re.split(r",(?![^\[]*\])", text) if v.strip()]


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` overrides (values parsed as YAML: ``1e-3``, ``[0.4, 1.0]``, ``true``)."""
    d = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        if key.strip() in RENAMED_KEYS:
            log.warning("%s is now %s: write %s=%s", key.strip(), RENAMED_KEYS[key.strip()],
                        RENAMED_KEYS[key.strip()], raw)
            key = RENAMED_KEYS[key.strip()]
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
            sizes = named_architecture(cfg.backbone.name, cfg.backbone.model_args)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        changed = {k: v for k, v in sizes.items() if getattr(cfg.backbone, k) != v}
        for k, v in sizes.items():
            setattr(cfg.backbone, k, v)
        if changed:
            sets = " ".join(f"backbone.{k}={v}" for k, v in changed.items())
            log.info("backbone.name=%s sets %s", cfg.backbone.name, sets)
    return cfg


def resolve_in_chans(cfg: TrainConfig) -> TrainConfig:
    """Replace ``backbone.in_chans=0`` by the data's channel count, saying so in one line (a folder that does not
    exist yet keeps 0: opening it fails with its own message)."""
    if cfg.backbone.in_chans:
        return cfg
    from pwself.data import DATA_KINDS

    data = cfg.data
    kind = DATA_KINDS.get(data.kind)
    if kind is None:  # validation names the unknown kind
        return cfg
    channels = kind.channels_at(data.root)
    if channels is None:
        return cfg
    if callable(kind.channels):  # read from the files: say so
        what = "colour images" if channels == 3 else "grey images only"
        log.info("backbone.in_chans=%d from the data (%s in %s); set backbone.in_chans=%d to override", channels,
                 what, data.root, 1 if channels == 3 else 3)
    cfg.backbone.in_chans = channels
    return cfg


def resolve_max_side(cfg: TrainConfig) -> TrainConfig:
    """Replace ``data.max_side=-1`` by the bound its views need (:func:`pwself.data.photos.auto_max_side`);
    0 for data that is not a folder (nothing to shrink)."""
    from pwself.data import DATA_KINDS

    if cfg.data.kind not in DATA_KINDS or DATA_KINDS[cfg.data.kind].in_memory:
        cfg.data.max_side = 0
    elif cfg.data.max_side == -1:
        from pwself.data.photos import auto_max_side

        v = cfg.views
        kinds = [(v.global_size, v.global_scale[0])] + ([(v.local_size, v.local_scale[0])] if v.n_local else [])
        cfg.data.max_side = auto_max_side(kinds)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file's content (safe, no key twice); :class:`ConfigError` naming the line that cannot be read."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{what} {path} is not valid YAML{where} ({problem}): fix that line") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                from_data: bool = True, validate: bool = True) -> TrainConfig:
    """Defaults <- YAML file (a path or a shipped config name) <- overrides, validated (unless ``validate`` is
    false). ``from_data=False`` leaves what the data decides (``backbone.in_chans=0``) as it is, e.g. for a config
    a user saves and edits."""
    cfg = TrainConfig()
    if path is not None:
        path = resolve_config(path)
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        cfg = config_from_dict(d)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = resolve_image_size(apply_backbone_name(cfg))
    if from_data:
        cfg = resolve_in_chans(cfg)
    if validate:
        cfg.validate()
    return cfg


def run_config(cfg: TrainConfig) -> TrainConfig:
    """The config a run trains with: a copy with the ``backbone.name`` preset applied and what comes from the data
    resolved (folder image size, channels, the shrink bound of photos), then validated; ``cfg`` is not changed."""
    cfg = resolve_max_side(resolve_in_chans(resolve_image_size(apply_backbone_name(copy.deepcopy(cfg)))))
    cfg.validate()
    return cfg


def resolve_image_size(cfg: TrainConfig) -> TrainConfig:
    """A folder's images are evaluated at least at the side the model trains and is exported at
    (``views.global_size``): kNN, probes and floors of a 64 px model never read 32 px thumbnails."""
    from pwself.data import DATA_KINDS

    kind = DATA_KINDS.get(cfg.data.kind)
    if kind is not None and not kind.in_memory and cfg.data.image_size < cfg.views.global_size:
        log.info("data.image_size=%d is below views.global_size=%d: folder images are evaluated at %d px",
                 cfg.data.image_size, cfg.views.global_size, cfg.views.global_size)
        cfg.data.image_size = cfg.views.global_size
    return cfg


def save_config(cfg: TrainConfig, path: str | Path, derived: str = "") -> None:
    """Write the config as YAML (atomically); ``derived``, values the run computes from its settings (the peak lr
    of its global batch), ends the file as a comment: read back, only the settings count."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    note = f"# derived at start (not settings): {derived}\n" if derived else ""
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + note)
    tmp.replace(path)


# Keys that may change between a checkpoint and its resumption without changing what is learned. `epochs` is
# not one: it sets the length of every cosine schedule, so a resumed run with other epochs would not continue
# the run it resumes (train a new run instead).
RESUME_FREE_KEYS = ("out_dir", "device", "log_every", "checkpoint_every_steps", "checkpoint_every_minutes",
                    "keep_checkpoints", "eval.knn_at_end", "recipe",
                    "eval.knn_every_epochs", "eval.dense_every_epochs", "eval.dense_data", "data.num_workers",
                    "data.root", "data.on_bad_image", "data.image_size",
                    "optim.max_nonfinite_steps", "loss.recompute_head", "eval.knn_floors", "log.tensorboard",
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


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]


def describe_config(cfg: TrainConfig) -> str:
    """Every key of a config with its value and a one-line description, as YAML a user can save and edit."""
    out = ["# pwself config: every key, its value and what it means. Save it, edit it, pass it with --config FILE.",
           "# Any key can also be set on the command line: KEY=VALUE, e.g. optim.lr=1e-3 views.n_local=8."]

    def walk(obj: Any, indent: str) -> None:
        docs = field_help(type(obj))
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
