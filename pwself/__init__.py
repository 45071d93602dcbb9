"""pwself: patch-wise self-supervised pretraining of Vision Transformers (PW-Self, DINO, iBOT and relatives).

The stable API is what this package exports (:data:`__all__`); each name is imported on first use, so
``import pwself`` stays light. Everything else (``pwself.train`` internals, ``cli``, ``pwself.run``,
the checkpoint layout) is internal and may change between versions.

>>> import pwself
>>> sorted(pwself.OBJECTIVES)[:3]
['bagssl', 'cossl', 'dino']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The stable building blocks, by the module that defines them.
_EXPORTS = {
    "TrainConfig": "pwself.config", "load_config": "pwself.config",
    "MultiCrop": "pwself.views", "MultiCropViews": "pwself.views",
    "match_pair": "pwself.matching", "match_views": "pwself.matching",
    "DINOHead": "pwself.models", "DistillNet": "pwself.models",
    "distillation_loss": "pwself.losses", "koleo_loss": "pwself.losses", "sinkhorn_knopp": "pwself.losses",
    "gram_loss": "pwself.losses",
    "draw_masks": "pwself.masking",
    "cosine_schedule": "pwself.schedules",
    "build_step": "pwself.step",
    "Objective": "pwself.objectives", "OBJECTIVES": "pwself.objectives", "register_objective": "pwself.objectives",
    "evaluate": "pwself.eval.protocols", "EvalData": "pwself.eval.protocols", "EvalSettings": "pwself.eval.protocols",
    "knn_classify": "pwself.eval.knn",
    "Protocol": "pwself.eval.registry", "PROTOCOLS": "pwself.eval.protocols",
    "register_protocol": "pwself.eval.protocols",
    "DataKind": "pwself.data.kinds", "DATA_KINDS": "pwself.data.kinds", "register_data_kind": "pwself.data.kinds",
    "RunFolder": "pwself.run.folder",
}
__all__ = ["load", "pretrain", "__version__", *_EXPORTS]

if TYPE_CHECKING:
    from pathlib import Path

    from timm.models.vision_transformer import VisionTransformer

    from pwself.config import TrainConfig
    from pwself.train import TrainResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'pwself' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def load(path: str | Path) -> VisionTransformer:
    """Load the teacher backbone of a pwself run folder, checkpoint or export folder as a timm ViT in eval mode,
    carrying the run's input size, mean, std and interpolation in its ``pretrained_cfg`` (so
    ``timm.data.resolve_model_data_config(model)`` gives the right transform; see :func:`pwself.export.load`)."""
    from pwself.export import load as _load

    return _load(path)


def pretrain(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Pretrain with the standard evaluation (kNN and floors), as ``pwself pretrain`` does
    (see :func:`pwself.experiment.pretrain`)."""
    from pwself.experiment import pretrain as _pretrain

    return _pretrain(cfg, resume, progress, overwrite)
