"""pwself: patch-wise self-supervised pretraining of Vision Transformers (PW-Self, DINO and relatives)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "pretrain", "__version__"]

if TYPE_CHECKING:
    from pathlib import Path

    from timm.models.vision_transformer import VisionTransformer

    from pwself.config import TrainConfig
    from pwself.train import TrainResult


def load(path: str | Path) -> VisionTransformer:
    """Load the teacher backbone of a pwself checkpoint as a timm ViT (see :func:`pwself.export.load`)."""
    from pwself.export import load as _load

    return _load(path)


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Pretrain with the standard evaluation (kNN and floors), as ``pwself pretrain`` does
    (see :func:`pwself.pretraining.pretrain`)."""
    from pwself.pretraining import pretrain as _pretrain

    return _pretrain(cfg, resume, progress, overwrite)
