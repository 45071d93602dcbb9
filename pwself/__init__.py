"""pwself: patch-wise self-supervised pretraining of Vision Transformers (PW-Self, DINO and relatives)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "__version__"]

if TYPE_CHECKING:
    from pathlib import Path

    from timm.models.vision_transformer import VisionTransformer


def load(path: str | Path) -> VisionTransformer:
    """Load the teacher backbone of a pwself checkpoint as a timm ViT (see :func:`pwself.export.load`)."""
    from pwself.export import load as _load

    return _load(path)
