"""Command line: ``pwself pretrain``, ``eval-knn``, ``viz-matches``, ``viz-attention``, ``export``, ``report``.

The only module that reads config files; everything else takes typed arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pwself.objectives import DEFAULT_OBJECTIVE, OBJECTIVES

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
    p.add_argument("--objective", choices=list(OBJECTIVES), help=f"loss (default {DEFAULT_OBJECTIVE})")
    p.add_argument("--seed", type=int, help="seed of the whole run")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")


EVAL_HELP = """\
Evaluate frozen features of one or more models side by side. A model is a pwself checkpoint (file or run
directory) or a timm model name (random init: the floor to beat). Features are cached in --cache-dir,
keyed by the weights' SHA-256, the dataset, the transform and the pooling. Results: JSON + Markdown table
(--output PREFIX writes PREFIX.json and PREFIX.md).
"""


def _add_eval_common(p: argparse.ArgumentParser, labelled: bool = True) -> None:
    p.add_argument("models", nargs="+", help="checkpoint files / run directories / timm model names")
    if labelled:
        p.add_argument("--data-kind", help="idx, cifar, folder or synthetic (default: the first checkpoint's)")
        p.add_argument("--data-root", help="dataset directory (default: the first checkpoint's)")
        p.add_argument("--pooling", default="cls",
                       help="cls, mean-patch, cls+mean, last4 (comma-separated for several)")
    p.add_argument("--in-chans", type=int, help="input channels of a timm model (default: from the data)")
    p.add_argument("--img-size", type=int, help="input side of a timm model (default: from the data)")
    p.add_argument("--cache-dir", default=".pwself_cache", help="feature cache ('' to disable)")
    p.add_argument("--output", help="write PREFIX.json and PREFIX.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval_knn(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval-knn", help="weighted kNN (T=0.07, k grid) on frozen features", description=EVAL_HELP,
                       formatter_class=fmt)
    _add_eval_common(p)
    p.add_argument("--ks", default="10,20,100,200", help="comma-separated k values (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p = sub.add_parser("eval-linear", help="linear probe on frozen features (lr x wd grid, chosen on held-out train)",
                       description=EVAL_HELP, formatter_class=fmt)
    _add_eval_common(p)
    p.add_argument("--epochs", type=int, default=30, help="epochs of each linear head (default 30)")
    p = sub.add_parser("eval-copydetect", help="copy detection mAP (Copydays layout, CLS+GeM, PCA whitening)",
                       description=EVAL_HELP, formatter_class=fmt)
    _add_eval_common(p, labelled=False)
    p.add_argument("--data-path", required=True, help="Copydays-layout folder (original/, strong/, ...)")
    p.add_argument("--generate-from", help="first build the set at --data-path from this image folder")
    p.add_argument("--imsize", type=int, help="square input side (default: the model's global size)")
    p.add_argument("--no-whitening", action="store_true", help="skip PCA whitening")
    p = sub.add_parser("eval-retrieval", help="revisited Oxford/Paris retrieval mAP (E/M/H)", description=EVAL_HELP,
                       formatter_class=fmt)
    _add_eval_common(p, labelled=False)
    p.add_argument("--gnd", required=True, help="gnd_<ds>.pkl (or .json with imlist/qimlist/gnd)")
    p.add_argument("--images", help="image folder (default: jpg/ beside the gnd file)")
    p.add_argument("--imsize", type=int, default=224, help="longest side (thumbnail, default 224)")
    p.add_argument("--no-crop-queries", action="store_true", help="use full query images (dino's numbers)")
    p.add_argument("--multiscale", action="store_true", help="average descriptors over scales 1, 1/sqrt2, 1/2")
    p = sub.add_parser("eval", help="every protocol that the given data allows", description=EVAL_HELP,
                       formatter_class=fmt)
    _add_eval_common(p)
    p.add_argument("--ks", default="10,20,100,200", help="kNN k values")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--epochs", type=int, default=30, help="linear probe epochs")
    p.add_argument("--copydetect-path", help="Copydays-layout folder: adds copy detection")
    p.add_argument("--gnd", help="retrieval ground truth: adds image retrieval")
    p.add_argument("--images", help="retrieval image folder")


def _add_viz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz-matches", help="draw two views of each image and their matched patches (paper Fig. 2)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", default="viz_matches", help="where the PNGs go")
    p.add_argument("--size", type=int, default=64, help="side the image is resized to first (default 64)")
    p.add_argument("--global-size", type=int, default=48, help="global view side (default 48)")
    p.add_argument("--local-size", type=int, default=24, help="local view side (default 24)")
    p.add_argument("--patch-size", type=int, default=8, help="patch side (default 8)")
    p.add_argument("--photometric", default="patch", choices=["patch", "image", "none"])
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("viz-attention", help="last-layer CLS attention per head and a patch-feature PCA map")
    p.add_argument("checkpoint", help="checkpoint .pt file or run directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", default="viz_attention", help="where the PNGs go")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the teacher backbone with timm key names (safetensors or .pth)")
    p.add_argument("checkpoint", help="checkpoint .pt file or run directory")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "timm"])
    p.add_argument("--output", help="output file (default: beside the checkpoint)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train and evaluate several objectives on the same data/model/budget/seeds; table + bar plot",
        description="Runs every objective x seed sequentially into OUT/<objective>_seed<seed>/ (finished runs are "
        "skipped, interrupted ones resume), evaluates kNN and a linear probe, and writes comparison.md/.json/.png. "
        "An objective may carry overrides after ':' joined by '+', e.g. pwml:photometric.mode=none.",
    )
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma-separated, from {', '.join(OBJECTIVES)} "
                   "(default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--config", help="base YAML config (same for every run)")
    p.add_argument("--out-dir", default="runs/compare")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="base config overrides")


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
    import torch.distributed as dist

    if dist.is_initialized():
        is_main = dist.get_rank() == 0
        dist.barrier()
        dist.destroy_process_group()
        if not is_main:
            return 0
    report = write_report(result.run_dir)
    if result.knn:
        print(knn_markdown(result.knn, cfg.loss.objective))
    print(f"checkpoint: {result.checkpoint}")
    print(f"backbone (timm keys, safetensors): {result.backbone}")
    print(f"report: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pwself.eval import suite

    protocols = {"eval-knn": ["knn"], "eval-linear": ["linear"], "eval-copydetect": ["copydetect"],
                 "eval-retrieval": ["retrieval"]}.get(args.command)
    if protocols is None:  # `pwself eval`: all that apply
        protocols = ["knn", "linear"] + (["copydetect"] if args.copydetect_path else []) + (
            ["retrieval"] if args.gnd else [])
    results = suite.run(args.models, protocols, args)
    print(suite.markdown(results))
    if args.output:
        suite.write(results, args.output)
        print(f"wrote {args.output}.json and {args.output}.md")
    return 0


def _read_images(paths: list[str], size: int, channels: int) -> list:
    from pwself.data.datasets import DatasetError, decode_image

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise DatasetError(f"image {p} does not exist: check the path")
        try:
            out.append(decode_image(Path(p), size, channels).float() / 255)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise DatasetError(f"cannot read image {p} ({type(e).__name__}): is it a valid image file?") from e
    return out


def _save_grid(pngs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pngs), figsize=(5 * len(pngs), 5), squeeze=False)
    for ax, png in zip(axes[0], pngs):
        ax.imshow(plt.imread(png))
        ax.set_title(png.stem, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_viz_matches(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from pwself.viz import draw_matches

    for name, v in (("--global-size", args.global_size), ("--local-size", args.local_size)):
        if v % args.patch_size:
            raise ValueError(f"{name} {v} is not a multiple of --patch-size {args.patch_size}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for path, img in zip(args.images, _read_images(args.images, args.size, 3)):
        png = out / f"{Path(path).stem}_matches.png"
        fig = draw_matches(img, args.patch_size, args.global_size, args.local_size, args.seed, args.photometric, png,
                           title=Path(path).name)
        plt.close(fig)
        pngs.append(png)
    _save_grid(pngs, out / "grid.png")
    print(f"wrote {len(pngs)} PNGs and {out / 'grid.png'}")
    return 0


def cmd_viz_attention(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from pwself.checkpoint import config_of_checkpoint, load_checkpoint
    from pwself.export import teacher_backbone
    from pwself.viz import draw_attention

    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_of_checkpoint(ckpt)
    backbone = teacher_backbone(ckpt)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    size = cfg.views.global_size
    for path, img in zip(args.images, _read_images(args.images, size, cfg.backbone.in_chans)):
        png = out / f"{Path(path).stem}_attention.png"
        plt.close(draw_attention(backbone, img, cfg.data.mean, cfg.data.std, size, png, title=Path(path).name))
        pngs.append(png)
    _save_grid(pngs, out / "grid.png")
    print(f"wrote {len(pngs)} PNGs and {out / 'grid.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pwself.export import export_checkpoint

    default = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    output = args.output or default / ("teacher_backbone.safetensors" if args.format == "safetensors"
                                       else "teacher_backbone_timm.pth")
    path, code = export_checkpoint(args.checkpoint, output, args.format)
    print(f"wrote {path}\nload it with:\n  import timm\n  model = {code}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pwself.compare import comparison_table, run_comparison
    from pwself.config import load_config

    base = load_config(args.config, list(args.overrides))
    objectives = [o for o in re.split(r",(?![^\[]*\])", args.objectives) if o]  # commas inside [..] are values
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    results = run_comparison(base, objectives, seeds, args.out_dir, progress=not args.no_progress)
    print(comparison_table(results))
    print(f"wrote {Path(args.out_dir) / 'comparison.md'} and comparison.png")
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
    _add_viz(sub)
    _add_export(sub)
    _add_compare(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    handlers = {"pretrain": cmd_pretrain, "eval-knn": cmd_eval, "eval-linear": cmd_eval, "eval": cmd_eval,
                "eval-copydetect": cmd_eval, "eval-retrieval": cmd_eval, "report": cmd_report,
                "viz-matches": cmd_viz_matches, "compare": cmd_compare, "viz-attention": cmd_viz_attention,
                "export": cmd_export}
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
