"""Run evaluation protocols for several models and tabulate them side by side (used by the CLI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pwself.data import DatasetError, build_dataset
from pwself.eval.source import FeatureSource, cached_features, open_source

__all__ = ["run", "markdown", "write", "open_sources"]


def _data_settings(args: argparse.Namespace, sources: list[FeatureSource]) -> dict[str, Any]:
    """Dataset of the classification protocols: flags first, else the first checkpoint's config."""
    cfg = next((s.config for s in sources if s.config), {})
    data = dict(cfg.get("data", {}))
    kind = getattr(args, "data_kind", None) or data.get("kind")
    root = getattr(args, "data_root", None) or data.get("root")
    if not kind:
        raise DatasetError("no dataset to evaluate on: pass --data-kind and --data-root (no pwself checkpoint given)")
    # A checkpoint's model takes its own channels; without one the data is read as --in-chans says (default 3).
    channels = cfg.get("backbone", {}).get("in_chans") or getattr(args, "in_chans", None) or 3
    return {"kind": kind, "root": root or "", "image_size": data.get("image_size", 32), "channels": channels,
            "synthetic_size": data.get("synthetic_size", 512),
            "synthetic_classes": data.get("synthetic_classes", 4), "seed": cfg.get("seed", 0)}


def open_sources(models: list[str], args: argparse.Namespace, channels: int, size: int) -> list[FeatureSource]:
    """Open every model on the ``--device`` (a timm name takes ``channels`` and ``size`` unless flags say)."""
    from pwself.runtime import resolve_device

    device = resolve_device(getattr(args, "device", None) or "auto")
    sources = [open_source(m, in_chans=args.in_chans or channels, img_size=args.img_size or size) for m in models]
    for src in sources:  # features are extracted where the backbone is
        src.backbone.to(device)
    return sources


def run(models: list[str], protocols: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every model with every protocol; returns ``{"models": [...], protocol: {model: result}}``."""
    from pwself.eval.knn import knn_classify
    from pwself.eval.linear import linear_probe

    progress = not args.no_progress
    cache = args.cache_dir or None
    # Open checkpoints first (they carry the dataset); timm names then take the data's channels/size.
    first = [open_source(m) for m in models if Path(m).exists()]
    out: dict[str, Any] = {"models": list(models)}
    if {"knn", "linear"} & set(protocols):
        ds_cfg = _data_settings(args, first)
        opts = {k: ds_cfg[k] for k in ("image_size", "channels", "synthetic_size", "synthetic_classes", "seed")}
        train, test = (build_dataset(ds_cfg["kind"], ds_cfg["root"], split, **opts) for split in ("train", "test"))
        image = train[0][0]
        sources = open_sources(models, args, image.shape[0], image.shape[-1])
        out["data"] = ds_cfg
        for pooling in args.pooling.split(","):
            feats = {}
            for src in sources:
                kw = dict(pooling=pooling, cache_dir=cache, progress=progress,
                          device=next(src.backbone.parameters()).device)
                f_tr, y_tr = cached_features(src, train, {**ds_cfg, "split": "train"}, **kw)
                f_te, y_te = cached_features(src, test, {**ds_cfg, "split": "test"}, **kw)
                feats[src.name] = (f_tr, y_tr, f_te, y_te)
            for name, (f_tr, y_tr, f_te, y_te) in feats.items():
                if "knn" in protocols:
                    ks = [int(k) for k in args.ks.split(",") if int(k) <= len(f_tr)]
                    if not ks:
                        raise ValueError(f"--ks {args.ks}: every k is larger than the train bank ({len(f_tr)} images): "
                                         f"use k <= {len(f_tr)}")
                    res = knn_classify(f_tr, y_tr, f_te, y_te, ks=ks, temperature=args.temperature)
                    out.setdefault("knn", {}).setdefault(pooling, {})[name] = {str(k): v for k, v in res.items()}
                if "linear" in protocols:
                    res = linear_probe(f_tr, y_tr, f_te, y_te, epochs=args.epochs)
                    out.setdefault("linear", {}).setdefault(pooling, {})[name] = res
    if "copydetect" in protocols:
        from pwself.eval.copydetect import evaluate_copydetect, generate_copydetect_set, read_copydays

        path = getattr(args, "data_path", None) or args.copydetect_path
        if getattr(args, "generate_from", None):
            layout = generate_copydetect_set(args.generate_from, path)
        else:
            layout = read_copydays(path)
        for src in open_sources(models, args, 3, 224):
            imsize = getattr(args, "imsize", None) or src.size
            channels = src.backbone.patch_embed.proj.in_channels
            res = evaluate_copydetect(src.backbone, layout, src.mean, src.std, imsize, channels,
                                      whiten=not getattr(args, "no_whitening", False), progress=progress)
            out.setdefault("copydetect", {})[src.name] = res
    if "retrieval" in protocols:
        from pwself.eval.retrieval import evaluate_retrieval

        images = args.images or str(Path(args.gnd).parent / "jpg")
        for src in open_sources(models, args, 3, 224):
            channels = src.backbone.patch_embed.proj.in_channels
            res = evaluate_retrieval(src.backbone, args.gnd, images, src.mean, src.std,
                                     imsize=getattr(args, "imsize", None) or 224,
                                     crop_queries=not getattr(args, "no_crop_queries", False),
                                     multiscale=getattr(args, "multiscale", False), channels=channels)
            out.setdefault("retrieval", {})[src.name] = res
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
