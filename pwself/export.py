"""Teacher backbones out of pwself checkpoints: safetensors/timm files and ready-to-use timm models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from pwself.checkpoint import CheckpointError, export_backbone, load_checkpoint
from pwself.config import TrainConfig, config_from_dict
from pwself.models import make_vit

__all__ = ["TIMM_BASE_NAME", "timm_create_kwargs", "teacher_backbone", "export_checkpoint", "load"]

# Any ViT builder name works: the architecture comes from the keyword arguments.
TIMM_BASE_NAME = "vit_tiny_patch16_224"


def timm_create_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(TIMM_BASE_NAME, ...)`` build a run's backbone."""
    backbone = cfg.backbone
    return {
        "img_size": cfg.views.global_size,
        "patch_size": backbone.patch_size,
        "in_chans": backbone.in_chans,
        "embed_dim": backbone.embed_dim,
        "depth": backbone.depth,
        "num_heads": backbone.num_heads,
        "mlp_ratio": backbone.mlp_ratio,
        "num_classes": 0,
        "dynamic_img_size": True,
    }


def _run_config(ckpt: dict[str, Any]) -> TrainConfig:
    if "config" not in ckpt or "teacher" not in ckpt:
        raise CheckpointError("not a pwself checkpoint (no config/teacher): pass a checkpoint_*.pt of pwself pretrain")
    return config_from_dict(ckpt["config"])


def teacher_backbone(ckpt: dict[str, Any]) -> VisionTransformer:
    """The teacher's backbone of a loaded checkpoint, in eval mode."""
    cfg = _run_config(ckpt)
    model = make_vit(cfg.backbone, cfg.views.global_size)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["teacher"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model.eval()


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "safetensors") -> tuple[Path, str]:
    """Write the teacher backbone of a checkpoint with timm key names.

    Args:
        checkpoint: pwself checkpoint file or run directory.
        output: Output file (``.safetensors`` for ``safetensors``, ``.pth`` for ``timm``).
        fmt: ``safetensors`` or ``timm`` (a plain ``torch.save`` state dict).

    Returns:
        The written path and the Python line that loads it with timm.
    """
    ckpt = load_checkpoint(checkpoint)
    model = teacher_backbone(ckpt)
    output = Path(output)
    if fmt == "safetensors":
        export_backbone(model, output)
    elif fmt == "timm":
        tmp = output.with_suffix(output.suffix + ".tmp")
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(output)
    else:
        raise ValueError(f"export format {fmt!r}: use safetensors or timm")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_create_kwargs(_run_config(ckpt)).items())
    code = (f"timm.create_model({TIMM_BASE_NAME!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(output)!r}), {kwargs})")
    return output, code


def load(path: str | Path) -> VisionTransformer:
    """The teacher backbone of a pwself checkpoint (file or run directory) as a timm ViT in eval mode.

    ``model.forward_features(x)`` gives normalized tokens (CLS first); inputs are normalized with the
    run's ``data.mean``/``data.std`` (see ``config.yaml`` beside the checkpoint).
    """
    return teacher_backbone(load_checkpoint(path))
