"""Run evaluation protocols for several models and tabulate them side by side (used by the CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pwself.data import DatasetError, build_dataset
from pwself.eval.protocols import FEATURE_PROTOCOLS, EvalData, EvalSettings, default_pooling, evaluate
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
    ``{"models": [...], protocol: {model: result}}`` (kNN and linear: ``{pooling: {model: result}}``)."""
    # Open checkpoints first (they carry the dataset); timm names then take the data's channels/size.
    first = [open_source(m) for m in models if Path(m).exists()]
    out: dict[str, Any] = {"models": list(models)}
    feature_protocols = [p for p in protocols if p in FEATURE_PROTOCOLS]
    data, channels, size = None, 3, 224
    if feature_protocols:
        ds_cfg = _data_settings(args, first)
        opts = {k: ds_cfg[k] for k in ("image_size", "channels", "synthetic_size", "synthetic_classes", "seed")}
        train, test = (build_dataset(ds_cfg["kind"], ds_cfg["root"], split, **opts) for split in ("train", "test"))
        if "knn" in protocols and min(args.ks) > len(train):
            raise ValueError(f"--ks {','.join(map(str, args.ks))}: every k is larger than the train bank ({len(train)} "
                             f"images): use k <= {len(train)}")
        data = EvalData(train, test, ds_cfg)
        channels, size = train[0][0].shape[0], train[0][0].shape[-1]
        out["data"] = ds_cfg
    if "dense" in protocols and not feature_protocols:  # a timm model takes the dense data's channels and side
        from pwself.data.dense import dense_input

        channels, size = dense_input(args.dense_root)
        size = args.dense.size if args.dense and args.dense.size else size
    sources = open_sources(models, args, channels, size)
    for src in sources:
        for pooling in args.pooling:  # `auto` is filed under the pooling it resolves to (cls, bag)
            pooling = default_pooling(src) if pooling == "auto" else pooling
            res = evaluate(src, data, feature_protocols, args, pooling)
            for name, value in res.items():
                value = {str(k): v for k, v in value.items()} if name == "knn" else value
                out.setdefault(name, {}).setdefault(pooling, {})[src.name] = value
        for name, value in evaluate(src, None, [p for p in protocols if p not in FEATURE_PROTOCOLS], args).items():
            out.setdefault(name, {})[src.name] = value
    if "dense" in protocols and args.dense and sources:  # the floors, on the classes the first model scanned
        from pwself.eval.dense import PIXEL_ROW, pixel_row, random_row

        names = out["dense"][sources[0].name]["names"]
        if args.dense.pixel_floor:
            out["dense"][PIXEL_ROW] = pixel_row(sources[0], args.dense_root, args.dense, names)
        if args.dense.random_floor:
            out["dense"].update(random_row(sources[0], args.dense_root, args.dense, names))
    return out


def markdown(results: dict[str, Any]) -> str:
    """One Markdown table per protocol, models as rows."""
    lines: list[str] = []
    for pooling, per_model in results.get("knn", {}).items():
        ks = list(next(iter(per_model.values())).keys())
        lines += [f"### kNN (weighted, T = 0.07), pooling {pooling}: top-1 / top-5 %", "",
                  "| model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, res in per_model.items():
            lines.append(f"| {name} | " + " | ".join(f"{res[k]['top1']:.2f} / {res[k]['top5']:.2f}" for k in ks) + " |")
        lines.append("")
    for pooling, per_model in results.get("linear", {}).items():
        lines += [f"### Linear probe, pooling {pooling}", "", "| model | top-1 % | top-5 % | chosen lr | chosen wd |",
                  "|---|---|---|---|---|"]
        for name, res in per_model.items():
            b = res["best"]
            lines.append(f"| {name} | {res['top1']:.2f} | {res['top5']:.2f} | {b['lr']:g} | {b['weight_decay']:g} |")
        lines.append("")
    if "copydetect" in results:
        blocks = list(next(iter(results["copydetect"].values())).keys())
        lines += ["### Copy detection mAP (CLS + GeM, top 20)", "", "| model | " + " | ".join(blocks) + " |",
                  "|---|" + "---|" * len(blocks)]
        for name, res in results["copydetect"].items():
            lines.append(f"| {name} | " + " | ".join(f"{res[b]:.3f}" for b in blocks) + " |")
        lines.append("")
    if "retrieval" in results:
        lines += ["### Retrieval mAP (revisited protocol, %)", "", "| model | E | M | H | crop queries |",
                  "|---|---|---|---|---|"]
        for name, res in results["retrieval"].items():
            cells = [f"{res[s]['mAP']:.2f}" if s in res else "n/a" for s in ("E", "M", "H")]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {res['crop_queries']} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], prefix: str | Path) -> None:
    """``PREFIX.json`` and ``PREFIX.md``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=2, default=str))
    Path(f"{prefix}.md").write_text(markdown(results))
