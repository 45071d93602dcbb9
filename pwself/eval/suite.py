"""Run evaluation protocols for several models and tabulate them side by side (used by the CLI)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwself.data import DatasetError, build_dataset
from pwself.eval.source import FeatureSource, cached_features, open_source

__all__ = ["run", "markdown", "write", "open_sources", "EvalSettings"]


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation commands set, as typed values (the CLI fills it from its flags).

    Attributes:
        data_kind, data_root: The dataset of kNN and linear (default: the first checkpoint's).
        pooling: Comma-separated poolings (``cls``, ``mean-patch``, ...).
        in_chans, img_size: Input channels and side of a timm model (default: from the data).
        cache_dir: Feature cache ('' or ``None``: none).
        device: Where features are extracted (``auto``: a GPU when there is one).
        progress: Progress bars.
        ks, temperature: kNN's k values (comma-separated) and vote temperature.
        epochs: Linear probe epochs.
        copydetect_path, generate_from, whiten: Copy detection's Copydays-layout folder, the image folder to
            build it from first, PCA whitening.
        imsize: Square input side of copy detection (default: the model's) and longest side of retrieval (224).
        gnd, images, crop_queries, multiscale: Retrieval's ground truth, image folder (default: jpg/ beside the
            ground truth), query cropping, multi-scale descriptors.
    """

    data_kind: str | None = None
    data_root: str | None = None
    pooling: str = "cls"
    in_chans: int | None = None
    img_size: int | None = None
    cache_dir: str | None = ".pwself_cache"
    device: str = "auto"
    progress: bool = True
    ks: str = "10,20,100,200"
    temperature: float = 0.07
    epochs: int = 30
    copydetect_path: str | None = None
    generate_from: str | None = None
    whiten: bool = True
    imsize: int | None = None
    gnd: str | None = None
    images: str | None = None
    crop_queries: bool = True
    multiscale: bool = False


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
    """Evaluate every model with every protocol; returns ``{"models": [...], protocol: {model: result}}``."""
    from pwself.eval.knn import knn_classify
    from pwself.eval.linear import linear_probe

    progress = args.progress
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

        path = args.copydetect_path
        if args.generate_from:
            layout = generate_copydetect_set(args.generate_from, path)
        else:
            layout = read_copydays(path)
        for src in open_sources(models, args, 3, 224):
            imsize = args.imsize or src.size
            channels = src.backbone.patch_embed.proj.in_channels
            res = evaluate_copydetect(src.backbone, layout, src.mean, src.std, imsize, channels,
                                      whiten=args.whiten, progress=progress)
            out.setdefault("copydetect", {})[src.name] = res
    if "retrieval" in protocols:
        from pwself.eval.retrieval import evaluate_retrieval

        images = args.images or str(Path(args.gnd).parent / "jpg")
        for src in open_sources(models, args, 3, 224):
            channels = src.backbone.patch_embed.proj.in_channels
            res = evaluate_retrieval(src.backbone, args.gnd, images, src.mean, src.std,
                                     imsize=args.imsize or 224, crop_queries=args.crop_queries,
                                     multiscale=args.multiscale, channels=channels)
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
