"""Start from existing weights: ``backbone.init=PATH`` loads a backbone from a local file (nothing is ever
downloaded): a pwself run folder, checkpoint or export (file or folder), a timm ``.safetensors``/``.pth``, or a
DINO / dinov2 checkpoint, with their key names mapped to timm's. Position embeddings of another grid are
resampled; any other mismatch is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from pwself.checkpoint import BACKBONE_FILE, CheckpointError

__all__ = ["read_backbone_state", "load_backbone_weights"]

_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_DROPPED = ("head.", "mask_token", "fc_norm.", "dino_head.", "ibot_head.")


def _file_state(path: Path) -> dict[str, Any]:
    if path.is_dir():
        for name in ("model.safetensors", BACKBONE_FILE):
            if (path / name).is_file():
                return _file_state(path / name)
        from pwself.checkpoint import latest_checkpoint

        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"backbone.init={path}: the folder holds no model.safetensors, "
                                  "teacher_backbone.safetensors or checkpoint: pass a weights file")
        return _file_state(found)
    if not path.is_file():
        raise CheckpointError(f"backbone.init={path} does not exist: pass a local weights file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise CheckpointError(f"backbone.init={path} cannot be read as safetensors ({type(e).__name__}): the file "
                                  "is damaged; export it again or pass another weights file") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - foreign pickles fail in many ways
        raise CheckpointError(f"backbone.init={path} cannot be read as weights ({type(e).__name__}): pass a "
                              ".safetensors, .pth or .pt file of tensors") from None


def read_backbone_state(path: str | Path) -> dict[str, Tensor]:
    """The backbone tensors of a weights file, with timm's key names."""
    state: Any = _file_state(Path(path).expanduser())
    if isinstance(state, dict) and "teacher" in state and isinstance(state["teacher"], dict):
        state = state["teacher"]  # pwself and DINO checkpoints: the teacher is the model to keep
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            continue
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        if not k.startswith(_DROPPED):
            out[k] = v
    return out


def _adapt(state: dict[str, Tensor], model: VisionTransformer, path: str | Path) -> dict[str, Tensor]:
    """Resample the position embeddings to the model's grid; refuse any other mismatch by name."""
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        hint = " (layer scale or register tokens: this backbone has neither)" if any(
            ".ls1." in k or "register" in k for k in unexpected) else ""
        raise CheckpointError(f"backbone.init={path} does not fit backbone: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}{hint}: set backbone.name or the backbone sizes to the file's model")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"backbone.init={path}: {k} is {tuple(state[k].shape)} in the file but "
                              f"{tuple(own[k].shape)} here: match backbone.patch_size, embed_dim and in_chans "
                              "to the file's model")
    return state


def load_backbone_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load a backbone's weights from ``path`` into ``model`` (strict, after key mapping and resampling)."""
    model.load_state_dict(_adapt(read_backbone_state(path), model, path))
