"""What to evaluate (a pwself checkpoint, or a timm model name with random init as a floor), and cached features."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pwself.data import fingerprint
from pwself.eval.features import extract_features
from pwself.run.checkpoint import CheckpointError
from pwself.run.folder import RunFolder

__all__ = ["FeatureSource", "open_source", "cached_features", "file_sha256", "load_or_compute"]

log = logging.getLogger(__name__)


@dataclass
class FeatureSource:
    """A frozen backbone and how to feed it.

    Attributes:
        name: Label in tables (the checkpoint path or the timm name).
        backbone: timm ViT in eval mode.
        mean: Input normalization mean.
        std: Input normalization std.
        size: Input side for classification-style protocols (kNN, linear).
        key: Identity of the weights, for the feature cache (checkpoint SHA-256, or timm name + seed).
        config: The pwself config dict of a checkpoint (empty for a timm model).
    """

    name: str
    backbone: nn.Module
    mean: list[float]
    std: list[float]
    size: int
    key: str
    config: dict[str, Any] = field(default_factory=dict)


def random_init_source(cfg: Any, mean: list[float], std: list[float], device: torch.device | str,
                       name: str = "random init") -> FeatureSource:
    """The configured backbone (a :class:`~pwself.config.TrainConfig`) at the init a run with ``cfg.seed``
    starts from, fed with ``mean`` and ``std``: the random-init floor."""
    from pwself.config import config_to_dict
    from pwself.models import make_vit

    torch.manual_seed(cfg.seed)  # the backbone is the first module a run builds after seeding: the same init
    backbone = make_vit(cfg.backbone, cfg.views.global_size).to(device).eval()
    key = f"random_init:{json.dumps(config_to_dict(cfg)['backbone'], sort_keys=True)}:seed{cfg.seed}"
    return FeatureSource(name, backbone, list(mean), list(std), cfg.views.global_size, key)


def random_init_like(src: FeatureSource) -> FeatureSource | None:
    """The backbone of a pwself run ``src`` at the init its run started from, fed like it; ``None`` for a source
    without a pwself config (a timm name is random already)."""
    if not src.config:
        return None
    from pwself.config import config_from_dict

    return random_init_source(config_from_dict(src.config), src.mean, src.std,
                              next(src.backbone.parameters()).device, "random init (same backbone)")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_exported_run(run_dir: Path) -> FeatureSource:
    """A run directory kept without its checkpoints (they hold the optimizer, several times the weights): the
    teacher backbone and the run's config."""
    from safetensors.torch import load_file

    from pwself.config import config_to_dict
    from pwself.models import make_vit
    from pwself.run.state import read_run_config

    cfg, folder = read_run_config(run_dir), RunFolder(run_dir)
    backbone = make_vit(cfg.backbone, cfg.views.global_size)
    try:
        backbone.load_state_dict(load_file(folder.backbone))
    except Exception as e:  # noqa: BLE001 - a damaged file or one of another architecture
        what = f"does not fit the run's {RunFolder.CONFIG}" if isinstance(e, RuntimeError) else "is damaged"
        raise CheckpointError(f"{folder.backbone} {what} ({type(e).__name__}): export it again from a "
                              "checkpoint of this run") from None
    return FeatureSource(str(run_dir), backbone.eval(), list(cfg.data.mean), list(cfg.data.std),
                         cfg.views.global_size, file_sha256(folder.backbone), config_to_dict(cfg))


def open_source(
    spec: str,
    *,
    in_chans: int = 3,
    img_size: int = 224,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    seed: int = 0,
) -> FeatureSource:
    """Open a checkpoint file / run directory, or build a timm model by name with random weights.

    Args:
        spec: Path of a pwself checkpoint or run directory, or a timm model name (``vit_tiny_patch16_224``).
        in_chans: Input channels for a timm model.
        img_size: Input side for a timm model.
        mean: Normalization mean for a timm model (default ImageNet's, repeated per channel).
        std: Normalization std for a timm model.
        seed: Seed of a timm model's random init.
    """
    from pwself.run.checkpoint import latest_checkpoint, load_checkpoint

    path = Path(spec)
    if path.exists():
        file = latest_checkpoint(path) if path.is_dir() else path
        folder = RunFolder(path)
        if file is None and folder.backbone.exists() and folder.config.exists():
            return _open_exported_run(path)
        if file is None:
            raise FileNotFoundError(f"no checkpoint nor {RunFolder.BACKBONE} + {RunFolder.CONFIG} in {path}: pass a "
                                    "checkpoint file or a run directory")
        from pwself.export import teacher_backbone

        ckpt = load_checkpoint(file)
        cfg = ckpt.get("config") or {}
        backbone = teacher_backbone(ckpt)
        return FeatureSource(str(spec), backbone, list(cfg["data"]["mean"]), list(cfg["data"]["std"]),
                             int(cfg["views"]["global_size"]), file_sha256(file), cfg)
    import timm

    if spec not in timm.list_models():
        raise FileNotFoundError(f"{spec!r} is neither an existing checkpoint path nor a timm model name")
    def build(side: int) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(spec, pretrained=False, num_classes=0, in_chans=in_chans, img_size=side,
                                 dynamic_img_size=True).eval()

    backbone = build(img_size)
    patch = backbone.patch_embed.patch_size[0]
    if img_size % patch:  # the data's side (28 for Fashion-MNIST) need not fit a patch-16 model: read it larger
        fitted = -(-img_size // patch) * patch
        log.info("%s: images read at %d px (the data's %d px rounded up to its %d px patches)", spec, fitted,
                 img_size, patch)
        backbone, img_size = build(fitted), fitted
    m = mean or ([0.485, 0.456, 0.406] if in_chans == 3 else [0.5] * in_chans)
    s = std or ([0.229, 0.224, 0.225] if in_chans == 3 else [0.5] * in_chans)
    return FeatureSource(f"{spec} (random init)", backbone, list(m), list(s), img_size,
                         f"timm:{spec}:{in_chans}:{img_size}:seed{seed}")


def cached_features(
    source: FeatureSource,
    dataset: Dataset,
    dataset_id: dict[str, Any],
    pooling: str = "cls",
    cache_dir: str | Path | None = None,
    normalize: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`extract_features` once per (weights, dataset, transform, pooling); later calls read the cache.

    Args:
        source: The model.
        dataset: Images to encode.
        dataset_id: What identifies the dataset (kind, root, split, ...); part of the cache key.
        pooling: Pooling (see :data:`pwself.eval.features.POOLINGS`).
        cache_dir: Cache directory (``None``: no cache).
        normalize: L2-normalize the features.
        **kwargs: Passed to :func:`extract_features` (batch size, workers, progress, ...).
    """
    # BagSSL's bag tiles the image at its native resolution (a tile is a training view's scale): never resized
    size = None if pooling == "bag" else source.size
    key_dict = {"weights": source.key, "data": dataset_id, "n": len(dataset), "content": fingerprint(dataset),
                "size": size,
                "mean": source.mean, "std": source.std, "pooling": pooling, "normalize": normalize}
    key = hashlib.sha256(json.dumps(key_dict, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def compute() -> dict[str, Any]:
        feats, labels = extract_features(source.backbone, dataset, source.mean, source.std, size=size,
                                         pooling=pooling, normalize=normalize, **kwargs)
        return {"features": feats, "labels": labels, "key": key_dict}

    cached = load_or_compute(Path(cache_dir) / f"features_{key}.pt" if cache_dir else None, compute)
    return cached["features"], cached["labels"]


def load_or_compute(path: Path | None, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once: its dict of tensors is saved atomically at ``path`` and read back by later calls
    (``None``: no cache; an unreadable file is computed again)."""
    if path is not None and path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways: recompute it
            log.warning("feature cache %s is unreadable (%s): computing the features again", path, type(e).__name__)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(path)
    return value
