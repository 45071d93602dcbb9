"""Run evaluation protocols for several models and tabulate them side by side (used by the CLI)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pwself.data import DatasetError, build_dataset
from pwself.eval.protocols import PROTOCOLS, EvalData, EvalSettings, default_pooling, evaluate, feature_protocols
from pwself.eval.source import FeatureSource, open_source

__all__ = ["run", "markdown", "write", "open_sources", "EvalSettings"]


def _data_settings(args: EvalSettings, sources: list[FeatureSource]) -> dict[str, Any]:
    """Dataset of the classification protocols: flags first, else the first checkpoint's config."""
    cfg = next((s.config for s in sources if s.config), {})
    data = dict(cfg.get("data", {}))
    kind = args.data_kind or data.get("kind")
    root = args.data_root or data.get("root")
    if not kind:
        raise DatasetError("no dataset to evaluate on: pass --data-kind and --data-root (no pwself checkpoint given)")
    # A checkpoint's model takes its own channels; without one the data is read as --in-chans says (default 3).
    channels = cfg.get("backbone", {}).get("in_chans") or args.in_chans or 3
    return {"kind": kind, "root": root or "", "image_size": data.get("image_size", 32), "channels": channels,
            "synthetic_size": data.get("synthetic_size", 512),
            "synthetic_classes": data.get("synthetic_classes", 4), "seed": cfg.get("seed", 0)}


def open_sources(models: list[str], args: EvalSettings, channels: int, size: int) -> list[FeatureSource]:
    """Open every model on the ``--device`` (a timm name takes ``channels`` and ``size`` unless flags say)."""
    from pwself.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    sources = [open_source(m, in_chans=args.in_chans or channels, img_size=args.img_size or size) for m in models]
    for src in sources:  # features are extracted where the backbone is
        src.backbone.to(device)
    return sources


def run(models: list[str], protocols: list[str], args: EvalSettings) -> dict[str, Any]:
    """Evaluate every model with every protocol (:func:`pwself.eval.protocols.evaluate`); returns
    ``{"models": [...], protocol: {model: result}, "settings": {protocol: its settings}}`` (feature protocols:
    ``{pooling: {model: result}}``)."""
    # Open checkpoints first (they carry the dataset); timm names then take the data's channels/size.
    first = [open_source(m) for m in models if Path(m).exists()]
    out: dict[str, Any] = {"models": list(models)}
    on_features = feature_protocols(protocols)
    data, channels, size = None, 3, 224
    if on_features:
        ds_cfg = _data_settings(args, first)
        opts = {k: ds_cfg[k] for k in ("image_size", "channels", "synthetic_size", "synthetic_classes", "seed")}
        train, test = (build_dataset(ds_cfg["kind"], ds_cfg["root"], split, **opts) for split in ("train", "test"))
        data = EvalData(train, test, ds_cfg)
        channels, size = train[0][0].shape[0], train[0][0].shape[-1]
        out["data"] = ds_cfg
    else:  # a timm model takes the channels and side of the first protocol's own data
        inputs = [PROTOCOLS[p].model_input for p in protocols if PROTOCOLS[p].model_input is not None]
        if inputs:
            channels, size = inputs[0](args.of(protocols[0]))
    sources = open_sources(models, args, channels, size)
    for src in sources:
        for pooling in args.pooling:  # `auto` is filed under the pooling it resolves to (cls, bag)
            pooling = default_pooling(src) if pooling == "auto" else pooling
            for name, value in evaluate(src, data, on_features, args, pooling).items():
                value = {str(k): v for k, v in value.items()} if name == "knn" else value
                out.setdefault(name, {}).setdefault(pooling, {})[src.name] = value
        for name, value in evaluate(src, None, [p for p in protocols if p not in on_features], args).items():
            out.setdefault(name, {})[src.name] = value
    for name in protocols:  # rows beside the models' (the dense floors)
        if PROTOCOLS[name].finish is not None and name in out:
            PROTOCOLS[name].finish(out[name], sources, args.of(name))
    # what each protocol ran with (its data folders included): the record of the numbers
    out["settings"] = {name: dataclasses.asdict(args.of(name)) for name in protocols
                       if dataclasses.is_dataclass(args.of(name))}
    return out


def markdown(results: dict[str, Any]) -> str:
    """One Markdown table per protocol (and pooling), models as rows, as each protocol draws it."""
    lines: list[str] = []
    for name, protocol in PROTOCOLS.items():
        if name not in results:
            continue
        if protocol.features:
            for pooling, per_model in results[name].items():
                lines += protocol.table(per_model, f"pooling {pooling}")
        else:
            lines += protocol.table(results[name], "")
    return "\n".join(lines)


def write(results: dict[str, Any], prefix: str | Path) -> None:
    """``PREFIX.json`` and ``PREFIX.md``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=2, default=str))
    Path(f"{prefix}.md").write_text(markdown(results))
