"""Teacher backbones out of pwself checkpoints: safetensors/timm files, model folders (weights + ``config.json``
+ model card, the field's convention) and ready-to-use timm models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from pwself.config import TrainConfig, config_to_dict
from pwself.data import DATA_KINDS
from pwself.models import make_vit
from pwself.run.checkpoint import (
    CheckpointError,
    config_of_checkpoint,
    export_backbone,
    latest_checkpoint,
    load_checkpoint,
    teacher_weights,
)
from pwself.run.folder import RunFolder

__all__ = ["export", "TIMM_BASE_NAME", "timm_architecture", "timm_create_kwargs", "teacher_backbone",
           "export_checkpoint", "export_folder", "push_to_hub", "load"]

# A plain ViT's builder: any ViT builder name works, the architecture comes from the keyword arguments.
TIMM_BASE_NAME = "vit_tiny_patch16_224"


def timm_architecture(cfg: TrainConfig) -> str:
    """The timm name a run's backbone is built by: ``backbone.name`` (any family), else the plain ViT builder."""
    return cfg.backbone.name or TIMM_BASE_NAME


def timm_create_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(timm_architecture(cfg), ...)`` build a run's backbone."""
    backbone = cfg.backbone
    if backbone.name:
        return {"img_size": cfg.views.global_size, "in_chans": backbone.in_chans, **backbone.model_args,
                "num_classes": 0, "dynamic_img_size": True}
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
        raise CheckpointError("not a pwself checkpoint (no config/teacher): pass a "
                              f"{RunFolder.CHECKPOINT_PATTERN} of pwself pretrain")
    return config_of_checkpoint(ckpt)


def input_config(cfg: TrainConfig) -> dict[str, Any]:
    """What the run's inputs must be, in timm's ``pretrained_cfg`` fields (``timm.data.resolve_model_data_config``
    and ``create_transform`` read them): side, mean, std, bicubic resize, no crop margin."""
    size = cfg.views.global_size
    return {"input_size": (cfg.backbone.in_chans, size, size), "mean": tuple(cfg.data.mean),
            "std": tuple(cfg.data.std), "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0}


def teacher_backbone(ckpt: dict[str, Any]) -> VisionTransformer:
    """The teacher's backbone of a loaded checkpoint, in eval mode, carrying the run's preprocessing in its
    ``pretrained_cfg``."""
    cfg = _run_config(ckpt)
    model = make_vit(cfg.backbone, cfg.views.global_size)
    model.load_state_dict(teacher_weights(ckpt, "backbone."))
    # Only what describes this model: a named family's own cfg names its released weights (hub id, tag, license).
    own = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items() if k in ("first_conv", "classifier")}
    model.pretrained_cfg = {"architecture": timm_architecture(cfg), **own, **input_config(cfg)}
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
    cfg = _run_config(ckpt)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_create_kwargs(cfg).items())
    code = (f"timm.create_model({timm_architecture(cfg)!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(output)!r}), {kwargs})")
    return output, code


def _published_root(cfg: TrainConfig) -> str:
    """What an export says of the training data's location: the folder's name only, never the local path (an
    exported model is meant to be shared)."""
    return Path(str(cfg.data.root)).name or str(cfg.data.root)


def _folder_extras(cfg: TrainConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What pwself adds to timm's ``config.json``: the input side, channels, normalization and the run."""
    b = cfg.backbone
    return {"img_size": cfg.views.global_size, "patch_size": b.patch_size, "in_chans": b.in_chans,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "pwself": {"objective": cfg.method, "step": int(ckpt.get("step", 0)), "seed": cfg.seed,
                       "head": config_to_dict(cfg.head),
                       "data": {"kind": cfg.data.kind, "root": _published_root(cfg)}}}


# Hugging Face reads the front matter (model index, filters); timm's hub loader reads config.json.
_FRONT_MATTER = """---
library_name: timm
license: {license}
pipeline_tag: image-feature-extraction
tags:
- timm
- image-feature-extraction
- self-supervised
- pwself
- {objective}
{datasets}---
"""

_CARD = """# pwself {objective} ViT (width {width}, depth {depth}, {heads} heads, patch {patch}, {side} px input)

Self-supervised teacher backbone trained with `pwself` (objective `{objective}`) for {steps} steps of batch
{batch} on `{kind}` data (`{root}`), seed {seed}. {built}

## Recipe

- views: {n_global} x {global_size} px global (scale {global_scale}) + {n_local} x {local_size} px local
  (scale {local_scale}); photometric augmentation `{photometric}`
- head output {out_dim}; teacher temperature {teacher_temp}; teacher momentum {momentum}
- lr {lr} per 256 images, i.e. {lr_batch:.3g} at batch {batch} (linear scaling)
- inputs: {channels} channel(s), normalized with mean {mean} and std {std}
{results}
## Load

```python
import pwself, timm
model = pwself.load("THIS_FOLDER")  # timm ViT, eval mode; model.forward_features(x): CLS first
data_cfg = timm.data.resolve_model_data_config(model)  # this run's input size, mean, std, bicubic
transform = timm.data.create_transform(**data_cfg)       # PIL image -> normalized tensor

# or with timm alone:
import json
cfg = json.load(open("THIS_FOLDER/config.json"))
model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                          pretrained_cfg_overlay=dict(file="THIS_FOLDER/model.safetensors", **cfg["pretrained_cfg"]))
```
"""


def _built(cfg: TrainConfig) -> str:
    """The card's sentence on how timm builds the model."""
    if cfg.backbone.name:
        return (f"timm's `{cfg.backbone.name}` ({type_words(cfg)}) built with the keyword arguments in "
                "`config.json` (`model_args`), loaded strictly by that name.")
    return ("A timm `VisionTransformer` built with the keyword arguments in `config.json` (`model_args`); its "
            "`architecture` field names the timm builder they are passed to, not the size of this model.")


def type_words(cfg: TrainConfig) -> str:
    """What the named backbone is beyond its sizes (registers, layer scale, RoPE), read from the model built."""
    from pwself.models import describe_backbone

    with torch.device("meta"):
        model = make_vit(cfg.backbone, cfg.views.global_size)
    return describe_backbone(model) or "plain ViT"


def _model_card(cfg: TrainConfig, ckpt: dict[str, Any], run_dir: Path, card_license: str = "apache-2.0") -> str:
    """README.md of an exported model: Hugging Face front matter (``library_name: timm``, license, tags, dataset),
    then what it is, how it was trained, what it scored, how to load it."""
    rows = []
    knn = (RunFolder(run_dir).read_json(RunFolder.KNN) or {}).get("knn")
    if knn:
        rows += [f"| kNN k={k} (T = 0.07) | {knn[k]['top1']:.2f} |" for k in sorted(knn, key=int)]
    linear = RunFolder(run_dir).scores().get("linear")
    if linear:
        rows.append(f"| linear probe | {linear['top1']:.2f} |")
    results = ("\n## Results (frozen features, top-1 %)\n\n| protocol | top-1 |\n|---|---|\n" + "\n".join(rows) + "\n"
               if rows else "")
    b, v, d = cfg.backbone, cfg.views, cfg.data
    hub = DATA_KINDS[d.kind].hub_dataset if d.kind in DATA_KINDS else None
    datasets = f"datasets:\n- {hub}\n" if hub else ""
    front = _FRONT_MATTER.format(license=card_license, objective=cfg.method, datasets=datasets)
    return front + "\n" + _CARD.format(
        built=_built(cfg), objective=cfg.method, width=b.embed_dim, depth=b.depth, heads=b.num_heads,
        patch=b.patch_size, side=v.global_size, lr_batch=cfg.optim.lr * cfg.batch_size / 256,
        steps=int(ckpt.get("step", 0)), batch=cfg.batch_size, kind=d.kind, root=_published_root(cfg), seed=cfg.seed,
        n_global=v.n_global, global_size=v.global_size, global_scale=list(v.global_scale), n_local=v.n_local,
        local_size=v.local_size, local_scale=list(v.local_scale), photometric=cfg.photometric.mode,
        out_dim=cfg.head.out_dim, teacher_temp=cfg.loss.teacher_temp, lr=cfg.optim.lr,
        momentum=cfg.optim.momentum_teacher, channels=b.in_chans, mean=list(d.mean), std=list(d.std), results=results)


FOLDER_FILES = ("model.safetensors", "config.json", "README.md")  # what export_folder writes
# The default output beside the checkpoint, per format: never the run's own teacher_backbone.safetensors.
EXPORT_NAMES = {"safetensors": "teacher_backbone_export.safetensors", "timm": "teacher_backbone_timm.pth",
                "folder": "model"}


def head_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The teacher's heads and mask token of a checkpoint (``head.*``, ``patch_head.*``, ``mask_token``): what
    another run needs besides the backbone to continue the training (``backbone.init`` reads them back)."""
    return {k: v.contiguous() for k, v in teacher_weights(ckpt).items()
            if k.startswith(("head.", "patch_head.")) or k == "mask_token"}


def export_folder(checkpoint: str | Path, output: str | Path, card_license: str = "apache-2.0",
                  heads: bool = False) -> Path:
    """Write a model folder with timm's own writer (``save_for_hf``: ``model.safetensors`` and ``config.json``,
    which ``timm.create_model("local-dir:FOLDER")`` and the Hub read) and a ``README.md`` model card.

    Args:
        checkpoint: pwself checkpoint file or run directory (its final kNN and compare's linear probe go on the card).
        output: The folder to write (created; each file is replaced whole, never left half-written).
        card_license: The card's license (the weights are the user's: set the one their data allows).
        heads: Also write the teacher's heads (and iBOT's mask token) as ``heads.safetensors``, and their sizes
            in ``config.json`` (``pwself.head``), so that a run with ``backbone.init=FOLDER`` continues them.
    """
    import os
    import tempfile

    from timm.models import save_for_hf

    ckpt = load_checkpoint(checkpoint)
    cfg = _run_config(ckpt)
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = teacher_backbone(ckpt)  # its pretrained_cfg names the architecture
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        save_for_hf(model, tmp, model_config=_folder_extras(cfg, ckpt), model_args=timm_create_kwargs(cfg),
                    safe_serialization=True)
        (Path(tmp) / "README.md").write_text(_model_card(cfg, ckpt, run_dir, card_license))
        names = list(FOLDER_FILES)
        if heads:
            from safetensors.torch import save_file

            from pwself.init_weights import HEADS_FILE

            save_file(head_state(ckpt), str(Path(tmp) / HEADS_FILE))
            names.append(HEADS_FILE)
        umask = os.umask(0)
        os.umask(umask)
        for name in names:
            os.chmod(Path(tmp) / name, 0o666 & ~umask)  # as any file the run writes (mkstemp makes 0600)
            os.replace(Path(tmp) / name, out / name)
    return out


# model_args that would make timm read or fetch something else than the folder's own weights.
_IO_ARGS = ("checkpoint_path", "cache_dir", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
            "pretrained_strict")


def _load_folder(folder: Path) -> VisionTransformer:
    """A model folder's model, built by timm from its ``config.json`` and its own ``model.safetensors`` only: an
    architecture that is not a local timm name (``hf-hub:``, ``local-dir:``) or arguments that point timm at other
    files are refused naming the file (nothing is ever downloaded)."""
    import timm

    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
        arch, args = cfg["architecture"], dict(cfg.get("model_args") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a model folder's config ({type(e).__name__}: {e}): export the model "
                              "again with pwself export RUN --format folder") from None
    if not isinstance(arch, str) or ":" in arch or arch not in timm.list_models():
        raise CheckpointError(f"{path}: architecture {arch!r} is not a timm model name (pwself never downloads): "
                              "set it to the timm name the weights were trained with, e.g. vit_small_patch16_224")
    bad = sorted(set(args) & set(_IO_ARGS))
    if bad:
        raise CheckpointError(f"{path}: model_args {', '.join(bad)} would make timm read other files: remove them "
                              "(the folder's model.safetensors holds the weights)")
    inputs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("pretrained_cfg", {}).items()
              if k not in ("file", "url", "hf_hub_id", "hf_hub_filename")}
    try:
        model = timm.create_model(arch, pretrained=True, **args,
                                  pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), **inputs))
    except (RuntimeError, TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"{folder}: timm cannot build {arch} from config.json and model.safetensors "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}): export the model again") from None
    return model.eval()


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported model folder to a Hugging Face Hub repository (needs the ``[hub]`` extra and a
    token); returns the repository URL. Nothing else in pwself touches the network."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("pushing to a model hub needs huggingface_hub: pip install 'pwself[hub]'") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder: run pwself export RUN --format folder "
                                f"{folder} first")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="pwself export")
    return str(url)


def load(path: str | Path) -> VisionTransformer:
    """The teacher backbone of a pwself checkpoint (file or run directory) or of an exported model folder, as a
    timm ViT in eval mode.

    ``model.forward_features(x)`` gives normalized tokens (CLS first); inputs are normalized with the
    run's ``data.mean``/``data.std`` (``config.yaml`` beside the checkpoint, or the folder's ``config.json``).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _load_folder(path)
    if path.suffix == ".safetensors":  # weights without their architecture and preprocessing
        raise CheckpointError(f"{path} holds weights only: pass the run folder ({path.parent}), a "
                              f"{RunFolder.CHECKPOINT_PATTERN}, "
                              "or an export folder (pwself export RUN --format folder OUT: model.safetensors + "
                              "config.json)")
    return teacher_backbone(load_checkpoint(path))


def export(checkpoint: str | Path, fmt: str = "safetensors", output: str | Path | None = None, overwrite: bool = False,
           card_license: str = "apache-2.0", heads: bool = False) -> tuple[Path, str]:
    """``pwself export``: write a run's teacher backbone as ``fmt`` (``safetensors``, ``timm`` or ``folder``) at
    ``output`` (default: beside the checkpoint, :data:`EXPORT_NAMES`, never the run's own files), refusing to
    replace an input, a run's own file or (without ``overwrite``) an existing one. Returns the path and the
    Python line that loads it."""
    from pwself.run.folder import RunDirError, check_output, holds_run

    source = Path(checkpoint).expanduser()
    default = source if source.is_dir() else source.parent
    output = Path(output or default / EXPORT_NAMES[fmt]).expanduser()
    newest = latest_checkpoint(source) if source.is_dir() else None
    inputs = (source, *([newest] if newest else []))
    if heads and fmt != "folder":
        raise ValueError("export --heads writes heads.safetensors into a model folder: add --format folder")
    if fmt == "folder":
        if holds_run(output):
            raise RunDirError(f"export: {output} holds a run: choose a new folder for the model (e.g. {output}/model)")
        for name in FOLDER_FILES:
            check_output(output / name, overwrite, inputs, what="export")
        folder = export_folder(checkpoint, output, card_license=card_license, heads=heads)
        return folder, f"pwself.load({str(folder)!r})"
    if not output.parent.is_dir():
        raise FileNotFoundError(f"export: folder {output.parent} does not exist: create it or choose another output")
    check_output(output, overwrite, inputs, what="export")
    return export_checkpoint(checkpoint, output, fmt)
