"""Start from existing weights: ``backbone.init=PATH`` loads a backbone from a local file (nothing is ever
downloaded): a pwself run folder, checkpoint or export (file or folder), a timm ``.safetensors``/``.pth``, or a
DINO / dinov2 / dinov3 checkpoint, with their key names mapped to timm's. Position embeddings of another grid are
resampled and a patch embedding of other channels is adapted (timm's ``adapt_input_conv``); any other mismatch is
refused by name. Head weights in the file (DINO's ``head``, dinov2's ``dino_head`` / ``ibot_head``, pwself's
``head`` / ``patch_head``) start the heads when their sizes fit; the mask token of a dinov2 backbone starts iBOT's.
:func:`load_start` returns the one line that says what was loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from pwself.run.checkpoint import CheckpointError
from pwself.run.folder import RunFolder

__all__ = ["read_backbone_state", "load_backbone_weights", "load_start", "HEADS_FILE", "StartState"]

HEADS_FILE = "heads.safetensors"  # written by `pwself export --heads` beside model.safetensors
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Head parts of a file, by the name each source gives them -> the DistillNet module they start.
_HEADS = {"head.": "head", "dino_head.": "head", "patch_head.": "patch_head", "ibot_head.": "patch_head"}
_DROPPED = ("fc_norm.", "student.", "gram_teacher.")
# torch.nn.utils.weight_norm (DINO, dinov2) names -> the parametrization pwself's heads use.
_WEIGHT_NORM = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}


@dataclass
class StartState:
    """The tensors of a weights file, split by what they start."""

    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # "head" / "patch_head" -> state
    mask_token: Tensor | None = None


def _file_state(path: Path) -> dict[str, Any]:
    if path.is_dir():
        for name in ("model.safetensors", RunFolder.BACKBONE):
            if (path / name).is_file():
                state = _file_state(path / name)
                if (path / HEADS_FILE).is_file():  # an export with --heads: the heads beside the backbone
                    state = {**state, **_file_state(path / HEADS_FILE)}
                return state
        from pwself.run.checkpoint import latest_checkpoint

        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"backbone.init={path}: the folder holds no model.safetensors, "
                                  f"{RunFolder.BACKBONE} or checkpoint: pass a weights file")
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


def _model_state(state: Any) -> dict[str, Any]:
    """The model's tensors inside a checkpoint: the teacher of pwself, DINO and dinov2 files, else the model."""
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        return state["teacher"]  # pwself, DINO, dinov2 teacher_checkpoint: the teacher is the model to keep
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("teacher.") for k in state):  # dinov2 / dinov3 training checkpoints: student and teacher
        state = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    return state


def read_start_state(path: str | Path) -> StartState:
    """The tensors of a weights file with timm's key names, split into backbone, heads and mask token."""
    out = StartState({})
    for k, v in _model_state(_file_state(Path(path).expanduser())).items():
        if not isinstance(v, Tensor):
            continue
        k = k.removeprefix("module.")
        head = next((p for p in _HEADS if k.startswith(p)), None)
        if head is not None:
            rest = k[len(head):]
            out.heads.setdefault(_HEADS[head], {})[_WEIGHT_NORM.get(rest, rest)] = v
            continue
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        if k == "mask_token":
            out.mask_token = v.reshape(1, -1)
        elif not k.startswith(_DROPPED):
            out.backbone[k] = v
    return out


def read_backbone_state(path: str | Path) -> dict[str, Tensor]:
    """The backbone tensors of a weights file, with timm's key names."""
    return read_start_state(path).backbone


def _grid(n: int, prefix: int) -> str:
    side = round((n - prefix) ** 0.5)
    return f"{side}×{side}" if side * side == n - prefix else f"{n - prefix} cells"


def _adapt(state: dict[str, Tensor], model: nn.Module, path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """Resample the position embeddings to the model's grid and adapt the patch embedding's channels; refuse any
    other mismatch by name. Returns the state and what was changed, in words."""
    own, notes = model.state_dict(), []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        hint = ""
        if any(".ls1." in k or ".gamma" in k or "reg_token" in k for k in unexpected):
            hint = (" (the file has layer scale or register tokens: set backbone.name to its architecture, e.g. "
                    "vit_small_patch14_reg4_dinov2)")
        elif any("rope" in k for k in unexpected) or ("pos_embed" in missing and "pos_embed" not in state):
            hint = " (the file has no position embedding: a RoPE model, e.g. backbone.name=vit_small_patch16_dinov3)"
        raise CheckpointError(f"backbone.init={path} does not fit backbone: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}{hint}: set backbone.name (and backbone.model_args) to the file's "
                              "model")
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        before = _grid(state["pos_embed"].shape[1], prefix)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
        notes.append(f"pos_embed {before} → {grid[0]}×{grid[1]}")
    conv = "patch_embed.proj.weight"
    if conv in state and conv in own and state[conv].shape[1] != own[conv].shape[1] \
            and state[conv].shape[0] == own[conv].shape[0]:
        from timm.models import adapt_input_conv

        notes.append(f"patch embedding {state[conv].shape[1]} → {own[conv].shape[1]} channels")
        state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        sizes = _file_sizes(state)
        raise CheckpointError(f"backbone.init={path}: {k} is {tuple(state[k].shape)} in the file but "
                              f"{tuple(own[k].shape)} here (the file's model: {sizes}): set backbone.name and "
                              "backbone.model_args, or backbone.patch_size, embed_dim and depth, to the file's model")
    return state, notes


def _file_sizes(state: dict[str, Tensor]) -> str:
    """The sizes of the ViT a backbone state describes, in words (for errors)."""
    conv = state.get("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if conv is None:
        return f"depth {depth}"
    return f"width {conv.shape[0]}, depth {depth}, patch {conv.shape[-1]}, {conv.shape[1]} channel(s)"


def load_backbone_weights(model: nn.Module, path: str | Path, state: dict[str, Tensor] | None = None) -> list[str]:
    """Load a backbone's weights from ``path`` (or its ``state`` already read) into ``model`` (strict, after key
    mapping, resampling and channel adaptation); what was adapted, in words."""
    state, notes = _adapt(read_backbone_state(path) if state is None else dict(state), model, path)
    model.load_state_dict(state)
    return notes


def _load_head(module: nn.Module | None, state: dict[str, Tensor] | None, what: str) -> tuple[str, int]:
    """Start one head from the file's state when it fits: what happened, in words, and the tensors loaded."""
    if module is None:
        return "", 0
    if not state:
        return f"{what} not in the file: new {what}", 0
    own = module.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        width = state.get("last_layer.parametrizations.weight.original1", state.get("last_layer.weight"))
        size = f"{width.shape[0]} outputs" if width is not None else "other layers"
        return f"{what} in the file does not fit this run's head ({size}): new {what}", 0
    module.load_state_dict(state)
    return f"{what} from the file", len(state)


def load_start(net: nn.Module, path: str | Path) -> str:
    """Start a :class:`~pwself.models.DistillNet` from a weights file: the backbone (strict), the heads and the
    mask token when the file has them and they fit. Returns the line that says what was loaded, e.g.
    ``loaded 152 tensors from FILE (pos_embed 37×37 → 6×6, 4 registers, layer scale; DINO head not in the file:
    new DINO head)``."""
    from pwself.models import SplitPatchHead, describe_backbone

    start = read_start_state(path)
    if not start.backbone:
        raise CheckpointError(f"backbone.init={path} holds no backbone tensors: pass the file of a ViT")
    notes = load_backbone_weights(net.backbone, path, start.backbone)  # the file is read once
    patch_state = start.heads.get("patch_head")
    if isinstance(net.patch_head, SplitPatchHead) and patch_state:  # its MLP is the CLS head's
        patch_state = {k: v for k, v in patch_state.items() if k.startswith("last_layer.")}
    said = [_load_head(net.head, start.heads.get("head"), "DINO head"),
            _load_head(net.patch_head, patch_state, "patch head")]
    if net.mask_token is not None and start.mask_token is not None and start.mask_token.shape == net.mask_token.shape:
        with torch.no_grad():
            net.mask_token.copy_(start.mask_token)
        said.append(("mask token from the file", 1))
    n = len(start.backbone) + sum(count for _, count in said)
    kind = describe_backbone(net.backbone)
    what = ", ".join([*notes, *([kind] if kind else [])])
    heads = "; ".join(line for line, _ in said if line)
    return f"loaded {n} tensors from {path} ({what + '; ' if what else ''}{heads})"
