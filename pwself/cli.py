"""Command line: ``pwself pretrain``, ``pwself eval-knn``, ``pwself report``.

The only module that reads config files; everything else takes typed arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

PRETRAIN_HELP = """\
Pretrain a ViT with PW-Self (or DINO) on local images, then evaluate it with kNN and write a report.

Settings come from the defaults, then --config FILE (YAML), then the flags below, then any number of
KEY=VALUE overrides with dotted keys, e.g.:

  pwself pretrain --epochs 3 --objective pwml optim.lr=2e-3 views.n_local=4 photometric.mode=image

Default data: Fashion-MNIST from the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist). Other data: data.kind=cifar|folder|idx|synthetic data.root=DIR.
Outputs in --out-dir: config.yaml, metrics.jsonl, checkpoint_*.pt, teacher_backbone.safetensors,
knn.json, training_curves.png, report.md, report.html.
"""


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (PW-Self / DINO)", description=PRETRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--out-dir", help="run directory (default runs/pwself)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--objective", choices=["dino", "pwml", "pwsl", "pwll"], help="loss (default pwml)")
    p.add_argument("--seed", type=int, help="seed of the whole run")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")


def _add_eval_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-knn",
        help="weighted kNN accuracy of a checkpoint's frozen teacher features",
        description="Weighted kNN (cosine, T=0.07) on frozen teacher features of the train (bank) and test "
        "splits of the checkpoint's dataset (or --data-kind/--data-root).",
    )
    p.add_argument("checkpoint", help="checkpoint .pt file or run directory")
    p.add_argument("--ks", default="10,20,100,200", help="comma-separated k values (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p.add_argument("--pooling", default="cls", choices=["cls", "mean-patch", "cls+mean"], help="feature pooling")
    p.add_argument("--data-kind", help="dataset kind (default: the checkpoint's)")
    p.add_argument("--data-root", help="dataset directory (default: the checkpoint's)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML/Markdown report of a run directory")
    p.add_argument("run_dir", help="run directory of pwself pretrain")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pwself.config import apply_overrides, load_config
    from pwself.train import train
    from pwself.viz import knn_markdown, write_report

    cfg = load_config(args.config)
    flags = {"out_dir": args.out_dir, "epochs": args.epochs, "batch_size": args.batch_size,
             "loss.objective": args.objective, "seed": args.seed, "device": args.device}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    report = write_report(result.run_dir)
    if result.knn:
        print(knn_markdown(result.knn, cfg.loss.objective))
    print(f"checkpoint: {result.checkpoint}")
    print(f"backbone (timm keys, safetensors): {result.backbone}")
    print(f"report: {report}")
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import torch

    from pwself.checkpoint import load_checkpoint
    from pwself.eval import extract_features, knn_classify
    from pwself.train import build_student, config_of_checkpoint, open_dataset
    from pwself.viz import knn_markdown

    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_of_checkpoint(ckpt)
    if args.data_kind:
        cfg.data.kind = args.data_kind
    if args.data_root:
        cfg.data.root = args.data_root
    model = build_student(cfg)
    model.load_state_dict(ckpt["teacher"])
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    kw = dict(mean=cfg.data.mean, std=cfg.data.std, size=cfg.views.global_size, pooling=args.pooling,
              progress=not args.no_progress, num_workers=cfg.data.num_workers)
    with torch.inference_mode():
        f_tr, y_tr = extract_features(model.backbone, open_dataset(cfg, "train"), desc="features train", **kw)
        f_te, y_te = extract_features(model.backbone, open_dataset(cfg, "test"), desc="features test", **kw)
    ks = [k for k in ks if k <= len(f_tr)]
    res = knn_classify(f_tr, y_tr, f_te, y_te, ks=ks, temperature=args.temperature)
    print(knn_markdown(res, f"{cfg.loss.objective} step {ckpt['step']} ({args.pooling})"))
    if args.output:
        Path(args.output).write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": ckpt["step"],
                                                 "pooling": args.pooling, "knn": res}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pwself.viz import write_report

    if not Path(args.run_dir, "metrics.jsonl").exists():
        raise FileNotFoundError(f"{args.run_dir} has no metrics.jsonl: pass the --out-dir of a pwself pretrain run")
    print(f"report: {write_report(args.run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pwself`` command."""
    parser = argparse.ArgumentParser(prog="pwself", description="Patch-wise self-supervised pretraining of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_eval_knn(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    handlers = {"pretrain": cmd_pretrain, "eval-knn": cmd_eval_knn, "report": cmd_report}
    from pwself.checkpoint import CheckpointError
    from pwself.config import ConfigError
    from pwself.data import DatasetError

    try:
        return handlers[args.command](args)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"pwself {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pwself {args.command}: interrupted; resume with --resume (checkpoints are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
