"""Command line: ``pwself pretrain``, ``compare``, ``eval`` (and ``eval-knn``, ``eval-linear``,
``eval-copydetect``, ``eval-retrieval``, ``eval-dense``), ``make-scenes``, ``viz-matches``, ``viz-attention``,
``export``, ``report``.

Reads config files and flags into a :class:`~pwself.config.TrainConfig`; run messages and warnings of the
package go through :mod:`logging` and are printed to stderr as ``pwself: ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pwself.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, RECIPES
from pwself.run.folder import RunFolder

if TYPE_CHECKING:
    from pwself.config import TrainConfig
    from pwself.eval.protocols import EvalSettings
    from pwself.eval.registry import Protocol

__all__ = ["main"]

PRETRAIN_HELP = """\
Pretrain a ViT with PW-Self (or DINO) on local images, then evaluate it with kNN and write a report.

Settings come from the defaults, then --config FILE (YAML), then the flags below, then any number of
KEY=VALUE overrides with dotted keys, e.g.:

  pwself pretrain --epochs 3 --objective pwml optim.lr=2e-3 views.n_local=4 photometric.mode=image

Default data: Fashion-MNIST from the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist). Other data: data.kind=cifar|folder|idx|synthetic data.root=DIR.
""" + textwrap.fill(RunFolder.outputs_line(), 104) + "\n"


EVAL_HELP = """\
Evaluate frozen features of one or more models side by side. A model is a pwself checkpoint (file or run
directory) or a timm model name (random init: the floor to beat). Features are cached in --cache-dir,
keyed by the weights' SHA-256, the dataset, the transform and the pooling. Results: JSON + Markdown table
(--output PREFIX writes PREFIX.json and PREFIX.md).
"""


def _add_eval_common(p: argparse.ArgumentParser, labelled: bool = True) -> None:
    p.add_argument("models", nargs="+", help="checkpoint files / run directories / timm model names")
    if labelled:
        from pwself.data import DATA_KINDS

        p.add_argument("--data-kind", help=f"{', '.join(DATA_KINDS)} (default: the first checkpoint's)")
        p.add_argument("--data-root", help="dataset directory (default: the first checkpoint's)")
        p.add_argument("--pooling", default="auto",
                       help="auto (a pwself model as its objective pools, else cls), cls, mean-patch, cls+mean, last4, "
                            "bag (comma-separated for several)")
    p.add_argument("--in-chans", type=int, help="input channels of a timm model (default: from the data)")
    p.add_argument("--img-size", type=int, help="input side of a timm model (default: from the data)")
    p.add_argument("--cache-dir", default=".pwself_cache", help="feature cache ('' to disable)")
    p.add_argument("--device", default="auto", help="where features are extracted: auto (a GPU when there is one), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--output", help="write PREFIX.json and PREFIX.md")
    p.add_argument("--overwrite", action="store_true", help="replace PREFIX.json / PREFIX.md when they exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _args_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, or the name of a shipped config (fmnist_demo)")
    p.add_argument("--out-dir", help="run directory (default runs/pwself)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--steps", type=int, help="optimizer steps of the run instead of --epochs (a small folder)")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--objective", choices=[*OBJECTIVES, *RECIPES],
                   help=f"loss, or a recipe of several keys ({', '.join(RECIPES)}) (default {DEFAULT_OBJECTIVE})")
    p.add_argument("--seed", type=int, help="seed of the whole run")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto, a GPU when there is one)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--auto-resume", action="store_true", help="start a run, continue an interrupted one exactly, or "
                   "show a finished one's result without training again (what `make demo` runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out-dir that holds another run (that run is moved aside, not deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")


def _args_eval_protocol(protocol: Protocol, p: argparse.ArgumentParser) -> None:
    """``pwself eval-NAME``: the common flags and the protocol's own."""
    _add_eval_common(p, labelled=protocol.features)
    protocol.flags(p, True)


def _args_eval(p: argparse.ArgumentParser) -> None:
    """``pwself eval``: the common flags and those of every protocol it offers."""
    from pwself.eval.protocols import PROTOCOLS

    _add_eval_common(p)
    for protocol in PROTOCOLS.values():
        if protocol.in_eval:
            try:
                protocol.flags(p, False)
            except argparse.ArgumentError as e:  # a registered protocol whose flag another one has
                raise ValueError(f"protocol {protocol.name}: {e.argument_name} is taken on `pwself eval` by another "
                                 f"protocol: give {protocol.name}'s flag another name, or register it with "
                                 "in_eval=False") from None


def _args_viz_matches(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", default="viz_matches", help="where the PNGs go")
    p.add_argument("--size", type=int, default=0,
                   help="side the image is resized to first (default 0: the original, as training crops it)")
    p.add_argument("--run", help="a run folder or checkpoint: its view sizes, patch size, photometric mode and "
                   "channels (flags given here still win)")
    p.add_argument("--global-size", type=int, help="global view side (default: the run's, else 48)")
    p.add_argument("--local-size", type=int, help="local view side (default: the run's, else 24)")
    p.add_argument("--patch-size", type=int, help="patch side (default: the run's, else 8)")
    p.add_argument("--photometric", choices=["patch", "image", "none"], help="default: the run's, else patch")
    p.add_argument("--seed", type=int, default=0)


def _args_viz_curves(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (label: the directory name, or LABEL=DIR)")
    p.add_argument("--output", default="learning_curves.png", help="PNG path (a .json of the points beside it)")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="x axis: the process's CPU time (immune to other load; default) or wall time")
    p.add_argument("--floors", action="store_true", help="add the random-init and raw-pixel lines (computed "
                   "with the first run's config, cached in its directory)")
    p.add_argument("--metric", default="knn", choices=["knn", "miou"],
                   help="knn (eval.knn_every_epochs runs) or miou: the dense probe (eval.dense_every_epochs runs)")


def _args_viz_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint .pt file or run directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", default="viz_attention", help="where the PNGs go")


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint .pt file or run directory")
    p.add_argument("out", nargs="?", help="output file, or folder for --format folder (default: beside the checkpoint)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "timm", "folder"],
                   help="folder: model.safetensors + config.json + README.md model card, loads with pwself.load")
    p.add_argument("--output", help="same as OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never a run's own files)")
    p.add_argument("--license", default="apache-2.0",
                   help="the model card's license, a Hugging Face license id (default apache-2.0): set the one "
                        "your training images allow")
    p.add_argument("--heads", action="store_true",
                   help="with --format folder: also write the teacher's heads (heads.safetensors), so that "
                        "backbone.init=FOLDER continues them")


def _args_push_to_hub(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder written by pwself export RUN --format folder")
    p.add_argument("repo_id", help="USER/NAME")
    p.add_argument("--private", action="store_true")


def _args_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma-separated, from {', '.join(OBJECTIVES)} "
                   "(default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--config", help="base YAML config (same for every run)")
    p.add_argument("--out-dir", default="runs/compare")
    p.add_argument("--device", help="training and evaluation device (default: the config's, auto)")
    p.add_argument("--dense", metavar="DIR", help="dense dataset (e.g. from `pwself make-scenes`): adds the dense "
                   "probe (mIoU) of every run, the random init and raw pixels")
    p.add_argument("--protocols", default="", help="more evaluation protocols to score every run with, at their "
                   "defaults, as table columns (comma-separated; any of `pwself eval-NAME`, e.g. --protocols "
                   "centroid for a registered one); kNN and linear always run")
    p.add_argument("--runs-only", action="store_true", help="train and evaluate the runs only, no floors or table "
                   "(parallel workers sharing --out-dir); a later call without it collects them")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="base config overrides")


def _args_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", required=True, help=f"one of {', '.join([*OBJECTIVES, *RECIPES])}")
    p.add_argument("--trials", type=int, required=True, help="settings to train (the same number for every method)")
    p.add_argument("--config", help="base YAML config (the budget)")
    p.add_argument("--out-dir", default="runs/tune")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for the kNN score")
    from pwself.tune import SELECTION_METRICS

    p.add_argument("--select", choices=list(SELECTION_METRICS), default="knn", help="score each trial by held-out "
                   "kNN (default), by the dense probe's held-out mIoU on --dense (tuning for dense features), or by "
                   "Hummingbird retrieval's held-out mIoU (hbird: no probe to train)")
    p.add_argument("--dense", metavar="DIR", help="dense dataset of --select miou or hbird (pwself make-scenes "
                   "layout or your own masks); "
                   "only its train split is read")
    p.add_argument("--dense-heldout", type=int, default=500, metavar="N",
                   help="train images of --dense held out for the mIoU score (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the grid is drawn in")
    p.add_argument("--device", help="training device (default: the config's, auto)")
    p.add_argument("--trial", type=int, metavar="I", help="train and score trial I only (parallel workers sharing "
                   "--out-dir); a later call without it reads their scores and chooses")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("space", nargs="+", metavar="KEY=CHOICES",
                   help="e.g. objectives.logo.weight=0.1,0.5,1 optim.lr=1e-3,3e-3")


def _args_config(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    show = verbs.add_parser("show", help="print the config (defaults <- --config <- KEY=VALUE) as commented YAML",
                            description="Print every key, its value and a one-line description, as YAML you can save "
                            "and pass back with --config FILE.")
    show.add_argument("--config", help="YAML file or shipped config name (fmnist_demo)")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. optim.lr=1e-3")


def _args_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clear", action="store_true", help="remove the shrunk photo copies and scan records (they are "
                   "made again when needed)")


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory of pwself pretrain")


def _args_make_scenes(p: argparse.ArgumentParser) -> None:
    from pwself.data.datasets import FASHION_MNIST_DIR
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=42, help="canvas side in pixels (default 42)")
    p.add_argument("--train", type=int, default=10000, help="train scenes (default 10000)")
    p.add_argument("--test", type=int, default=2000, help="test scenes (default 2000)")
    p.add_argument("--items", default="2,4", help="MIN,MAX items per scene (default 2,4)")
    p.add_argument("--item-size", default="14,28", help="MIN,MAX item side in pixels (default 14,28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=FASHION_MNIST_DIR, help=f"IDX folder (default {FASHION_MNIST_DIR})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    p.add_argument("--no-progress", action="store_true")


def cmd_tune(args: argparse.Namespace) -> int:
    from pwself.config import load_config
    from pwself.objectives import objective_class
    from pwself.tune import TrialScore, parse_space, run_trial, run_tuning, tune_markdown

    objective_class(args.objective)  # an unknown name fails before anything trains
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: use --trials 1 or more")
    select = TrialScore(args.select, args.val_fraction, args.dense, args.dense_heldout)
    select.validate()
    space = parse_space(args.space)
    base = load_config(args.config, [*space.fixed] + ([f"device={args.device}"] if args.device else []))
    if args.trial is not None:
        row = run_trial(base, args.objective, space, args.trials, args.trial, args.out_dir, select, args.seed,
                        progress=not args.no_progress)
        print(f"trial {args.trial} {row['setting']}: {select.title} {row[select.key]:.2f}; run again without "
              "--trial to choose")
        return 0
    result = run_tuning(base, args.objective, space, args.trials, args.out_dir, select, args.seed,
                        progress=not args.no_progress)
    print(tune_markdown(result))
    print(f"wrote {Path(args.out_dir) / 'tune.md'}; compare it with: --objectives '{result['compare_label']}'")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pwself.config import ConfigError, describe_config, load_config

    # As written, not resolved from a data folder: a saved and edited copy must not pin its channels. A config
    # pretrain would refuse is still shown, so that it can be fixed, with what is wrong.
    cfg = load_config(args.config, list(args.overrides), from_data=False, validate=False)
    try:
        cfg.validate()
        problem = None
    except ConfigError as e:
        problem = e
    print(describe_config(cfg), end="")
    if problem is not None:
        print(f"pwself config: note: pretrain would refuse this config: {problem}", file=sys.stderr)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pwself.config import load_config
    from pwself.experiment import pretrain
    from pwself.objectives import objective_overrides
    from pwself.report import write_report
    from pwself.run.state import plan_run

    flags = {"out_dir": args.out_dir, "epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size,
             "seed": args.seed, "device": args.device}
    recipe = objective_overrides(args.objective) if args.objective else []
    overrides = recipe + [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(args.config, overrides)  # what comes from the data (channels) is read after the overrides
    if args.auto_resume and (args.resume or args.overwrite):
        raise ValueError("--auto-resume chooses between starting and resuming: drop --resume and --overwrite")
    plan = plan_run(cfg, overrides, args.config is not None, args.resume, args.auto_resume, _start_over_hint(args))
    if plan.finished is not None:
        return _show_finished(plan.cfg, plan.run_dir, plan.finished)
    result = pretrain(plan.cfg, resume=plan.resume, progress=not args.no_progress, overwrite=args.overwrite)
    from pwself.runtime import leave_distributed

    if not leave_distributed():  # under torchrun only rank 0 reports
        return 0
    _print_result(plan.cfg, result.run_dir, result.knn, result.floors, write_report(result.run_dir))
    return 0


def _print_result(cfg: TrainConfig, run_dir: Path, knn: dict | None, floors: dict | None, report: Path) -> None:
    from pwself.report import knn_markdown
    from pwself.run.checkpoint import latest_checkpoint
    from pwself.run.folder import RunFolder

    if knn:
        print(knn_markdown(knn, cfg.method, floors))
    print(f"checkpoint: {latest_checkpoint(run_dir) or run_dir}")
    print(f"backbone (timm keys, safetensors): {RunFolder(run_dir).backbone}")
    print(f"report: {report}")


def _show_finished(cfg: TrainConfig, run_dir: Path, result: dict) -> int:
    """A finished run's stored result, without training or evaluating again (the report is redrawn only
    when it is missing)."""
    from pwself.report import write_report
    from pwself.run.folder import RunFolder

    report = RunFolder(run_dir).report_html
    print(f"{run_dir} holds this run, finished at step {result.get('step')}: its stored result (nothing was "
          "trained or evaluated again)")
    _print_result(cfg, run_dir, result.get("knn"), result.get("floors"),
                  report if report.exists() else write_report(run_dir))
    return 0


# `make demo` names its own commands in the two hints below (the CLI's own commands are not on a make user's PATH).
def _start_over_hint(args: argparse.Namespace) -> str:
    """The command that starts a refused run over, in the caller's terms."""
    hint = os.environ.get("PWSELF_START_OVER")
    if hint:
        return f"start over with `{hint}`"
    return (f"start over with `pwself {shlex.join(a for a in args.argv if a != '--auto-resume')} --overwrite` (the "
            "old run is moved aside), or choose another --out-dir")


def _continue_hint(args: argparse.Namespace) -> str:
    """What continues an interrupted command, in the caller's terms: for pretrain the same command with
    ``--auto-resume`` (it starts over when no checkpoint was written yet, which ``--resume`` would refuse)."""
    again = os.environ.get("PWSELF_AGAIN")
    if again:
        return f"run `{again}` again to continue (checkpoints are kept)"
    if args.command == "pretrain":
        words = [a for a in args.argv if a not in ("--resume", "--overwrite", "--auto-resume")]
        return f"continue with `pwself {shlex.join(words)} --auto-resume` (checkpoints are kept)"
    return "run the same command again to continue (finished work is kept)"


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: use MIN,MAX, e.g. {flag} 2,4") from None
    return lo, hi


def cmd_make_scenes(args: argparse.Namespace) -> int:
    from pwself.data.scenes import SceneSpec, make_scenes

    spec = SceneSpec(args.size, args.train, args.test, _pair(args.items, "--items"),
                     _pair(args.item_size, "--item-size"), args.seed)
    summary = make_scenes(args.out, spec, args.source, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.train} train and {args.test} test scenes of {args.size} px to {args.out} "
          f"({len(summary['classes'])} classes incl. background; masks 255 = ignore)")
    print(f"dense probe: pwself eval-dense MODEL --data {args.out}; pretraining and kNN on the dominant class: "
          f"data.kind=folder data.root={Path(args.out) / 'dominant'}")
    return 0


def _eval_settings(args: argparse.Namespace) -> tuple[list[str], EvalSettings]:
    """The protocols a command asked for and their typed settings (no Namespace below the CLI): ``eval-NAME`` runs
    NAME; ``eval`` every protocol it offers whose data was given. Each protocol reads (and checks) its own flags."""
    from dataclasses import fields

    from pwself.eval.protocols import PROTOCOLS, EvalSettings

    alone = args.command != "eval"
    names = [args.command.removeprefix("eval-")] if alone else [n for n, p in PROTOCOLS.items() if p.in_eval]
    options = {name: PROTOCOLS[name].settings(args, alone) for name in names}
    common = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if hasattr(args, f.name)}
    common.update(progress=not args.no_progress, options={n: o for n, o in options.items() if o is not None})
    if "pooling" in common:
        from pwself.eval.features import POOLINGS

        common["pooling"] = tuple(common["pooling"].split(","))
        bad = [p for p in common["pooling"] if p not in ("auto", *POOLINGS)]
        if bad:
            raise ValueError(f"--pooling {args.pooling}: {', '.join(bad)} is not a pooling; use auto, "
                             f"{', '.join(POOLINGS)} (comma-separated for several)")
    return [n for n in names if options[n] is not None], EvalSettings(**common)


def _check_outputs(*paths: str | Path, overwrite: bool = True) -> None:
    """Refuse, before any work, outputs that would replace a run's own files (e.g. ``--output RUN/knn``), and
    without ``overwrite`` any file that exists (``--output proj/README`` would replace ``proj/README.md``)."""
    from pwself.run.folder import RunDirError, run_owned

    for path in paths:
        if run_owned(Path(path)):
            raise RunDirError(f"--output {path} would replace a file of the run in {Path(path).parent}: choose "
                              "another --output")
        if not overwrite and Path(path).exists():
            raise RunDirError(f"--output would replace {path}, which exists: choose another --output PREFIX, or add "
                              "--overwrite to replace it")


def cmd_eval(args: argparse.Namespace) -> int:
    from pwself.eval import suite

    if args.output:
        _check_outputs(f"{args.output}.json", f"{args.output}.md", overwrite=args.overwrite)
    protocols, settings = _eval_settings(args)
    results = suite.run(args.models, protocols, settings)
    print(suite.markdown(results))
    if args.output:
        suite.write(results, args.output)
        print(f"wrote {args.output}.json and {args.output}.md")
    return 0


def cmd_viz_matches(args: argparse.Namespace) -> int:
    from pwself.viz import match_figures, run_view_sizes

    run = run_view_sizes(args.run) if args.run else {}
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else run.get(k, default)
             for k, default in (("global_size", 48), ("local_size", 24), ("patch_size", 8), ("photometric", "patch"))}
    grid, disjoint = match_figures(args.images, Path(args.out_dir), sizes, args.seed, args.size, run.get("channels", 3))
    for name in disjoint:
        print(f"{name}: the two crops do not overlap, so no patch matches; try another --seed")
    print(f"wrote {len(args.images)} PNGs and {grid}")
    return 0


def cmd_viz_curves(args: argparse.Namespace) -> int:
    from pwself.viz import curve_hint, learning_curve, plot_learning_curves

    _check_outputs(args.output, Path(args.output).with_suffix(".json"))
    runs = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        points = learning_curve(path, args.metric)
        if not points:
            raise ValueError(f"{path} has no timed {args.metric} evaluation: {curve_hint(Path(path), args.metric)}")
        runs[label] = points
    floors = None
    if args.floors:
        from pwself.eval.floors import run_floors

        floors = run_floors(Path(args.runs[0].rpartition("=")[2]), args.metric)
    ylabel = "kNN top-1 % (k = 10, held-out)" if args.metric == "knn" else "dense probe mIoU % (test)"
    out = plot_learning_curves(runs, args.output, floors, "cpu_s" if args.clock == "cpu" else "train_s", ylabel)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "floors": floors}, indent=2))
    for label, points in runs.items():
        last = points[-1]
        what = "kNN k=10" if args.metric == "knn" else "mIoU"
        print(f"{label}: {last['top1']:.2f}% {what} after {last['step']} steps, {last['cpu_s'] / 60:.1f} "
              f"CPU-min ({last['train_s'] / 60:.1f} wall min)")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_viz_attention(args: argparse.Namespace) -> int:
    from pwself.viz import attention_figures

    grid = attention_figures(args.images, args.checkpoint, Path(args.out_dir))
    print(f"wrote {len(args.images)} PNGs and {grid}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pwself.export import export

    path, code = export(args.checkpoint, args.format, args.out or args.output, args.overwrite, args.license,
                        args.heads)
    if args.format == "folder":
        files = "model.safetensors, config.json, README.md" + (", heads.safetensors" if args.heads else "")
        print(f"wrote {path}/ ({files})\nload it with:\n  import pwself\n  model = {code}")
    else:
        print(f"wrote {path}\nload it with:\n  import timm\n  model = {code}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from pwself.data.datasets import cache_root
    from pwself.data.photos import cache_bound, cache_usage, clear_cache

    folder = cache_root()
    usage = cache_usage(folder)
    bound = cache_bound()
    print(f"{folder}: " + "; ".join(f"{n} {name} ({size / 1e9:.2f} GB)" for name, (n, size) in usage.items())
          + (f"; shrunk copies kept under {bound / 1e9:g} GB (PWSELF_CACHE_MAX_GB)" if bound else ""))
    if args.clear:
        clear_cache(folder)
        print(f"cleared {folder} (copies are made again by the next run's scan)")
    return 0


def cmd_push_to_hub(args: argparse.Namespace) -> int:
    from pwself.export import push_to_hub

    print(f"uploaded {args.folder} to {push_to_hub(args.folder, args.repo_id, args.private)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pwself.compare import comparison_table, extra_protocols, run_comparison
    from pwself.config import load_config, split_choices

    base = load_config(args.config, list(args.overrides) + ([f"device={args.device}"] if args.device else []))
    objectives = split_choices(args.objectives)  # commas inside [..] are values
    if not objectives:
        raise ValueError(f"--objectives {args.objectives!r} names no objective: give e.g. --objectives dino,pwml")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.dense:
        from pwself.data.dense import open_dense

        open_dense(args.dense, "test", 1, 8)  # a wrong folder fails now, not after hours of training
    protocols = extra_protocols(split_choices(args.protocols))
    results = run_comparison(base, objectives, seeds, args.out_dir, progress=not args.no_progress, dense=args.dense,
                             runs_only=args.runs_only, protocols=protocols)
    if args.runs_only:
        print(f"runs done in {args.out_dir}; run again without --runs-only to collect the table")
        return 0
    print(comparison_table(results))
    print(f"wrote {Path(args.out_dir) / 'comparison.md'} and comparison.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pwself.report import write_report

    if not RunFolder(args.run_dir).metrics.exists():
        raise FileNotFoundError(f"{args.run_dir} has no {RunFolder.METRICS}: pass the --out-dir of a pwself pretrain "
                                "run")
    print(f"report: {write_report(args.run_dir)}")
    return 0


class _StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (a handler that kept the stream would miss redirections)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


COMPARE_HELP = (
    "Runs every objective x seed sequentially into OUT/<objective>_seed<seed>/ (finished runs are "
    "skipped, interrupted ones resume), evaluates kNN, a linear probe (and with --dense the dense probe), and "
    "writes comparison.md/.json/.png. "
    "An objective may carry overrides after ':' joined by '+', e.g. pwml:photometric.mode=none."
)

TUNE_HELP = (
    "Trains --trials settings drawn from the KEY=CHOICE1,CHOICE2 grid (KEY=VALUE: fixed for all), "
    "each with the base config's budget, into OUT/trial_<i>/, and scores each by kNN (k=10) on a held-out "
    "share of the train split, or with --select miou --dense DIR by the dense probe's mIoU on held-out images "
    "of DIR/train; the test split is never read. Writes OUT/tune.md/.json and prints the "
    "`pwself compare --objectives` entry of the chosen setting."
)

MAKE_SCENES_HELP = (
    "Canvases holding several Fashion-MNIST items at random positions and sizes, "
                   "later items in front; masks: 0 background, 1 + class, 255 faint rims. Train scenes from the "
                   "train split, test scenes from the test split; OUT/dominant/{train,test}/<class>/ holds the "
                   "same images by dominant class for kNN, linear and pretraining (data.kind=folder)."
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help, the function that adds its arguments, and its handler (which parses
    and calls the library, nothing more); ``raw`` keeps the description's line breaks."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    description: str | None = None
    raw: bool = False


COMMANDS = (
    Command("pretrain", "self-supervised pretraining (PW-Self / DINO)",
            _args_pretrain, cmd_pretrain,
            description=PRETRAIN_HELP, raw=True),
    Command("viz-matches", "draw two views of each image and their matched patches (paper Fig. 2)",
            _args_viz_matches, cmd_viz_matches),
    Command("viz-curves", "kNN or dense mIoU against training time of several runs (eval.knn_every_epochs, "
            "eval.dense_every_epochs runs)",
            _args_viz_curves, cmd_viz_curves),
    Command("viz-attention", "last-layer CLS attention per head and a patch-feature PCA map",
            _args_viz_attention, cmd_viz_attention),
    Command("export", "the teacher backbone with timm key names: a model folder, safetensors or .pth",
            _args_export, cmd_export),
    Command("push-to-hub", "upload an exported model folder to the Hugging Face Hub (extra [hub])",
            _args_push_to_hub, cmd_push_to_hub),
    Command("compare", "train and evaluate several objectives on the same data/model/budget/seeds; table + bar plot",
            _args_compare, cmd_compare,
            description=COMPARE_HELP),
    Command("tune", "choose an objective's knobs on held-out train data (kNN or dense mIoU), the same budget for every "
            "method",
            _args_tune, cmd_tune,
            description=TUNE_HELP),
    Command("config", "show every config key with its value and meaning",
            _args_config, cmd_config),
    Command("cache", "show (or --clear) pwself's cache of shrunk photo copies and scan records",
            _args_cache, cmd_cache),
    Command("report", "write the HTML/Markdown report of a run directory",
            _args_report, cmd_report),
    Command("make-scenes", "build the Fashion-MNIST scene dataset for the dense probe",
            _args_make_scenes, cmd_make_scenes,
            description=MAKE_SCENES_HELP),
)


def commands() -> tuple[Command, ...]:
    """Every command: pretrain, then one ``eval-NAME`` per evaluation protocol (from the registry, so a protocol
    registered from outside the package has its command too) and ``eval``, then the rest."""
    from functools import partial

    from pwself.eval.protocols import PROTOCOLS

    evals = tuple(Command(f"eval-{p.name}", p.help, partial(_args_eval_protocol, p), cmd_eval,
                          description=p.description or EVAL_HELP, raw=p.description is None)
                  for p in PROTOCOLS.values())
    every = Command("eval", "every protocol that the given data allows", _args_eval, cmd_eval, description=EVAL_HELP,
                    raw=True)
    return (COMMANDS[0], *evals, every, *COMMANDS[1:])


def _setup_logging() -> None:
    logger = logging.getLogger("pwself")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("pwself: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _parse(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction,
           argv: list[str] | None) -> argparse.Namespace:
    """Parse with positionals (KEY=VALUE overrides, output paths) anywhere among the flags: the command's own
    parser runs argparse's intermixed parsing (which the top-level parser, having subcommands, cannot)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = parser.parse_known_args(argv)[0].command
    own = sub.choices[command]
    if any(isinstance(a, argparse._SubParsersAction) for a in own._actions):  # `config show`: plain parsing
        return parser.parse_args(argv)
    args = own.parse_intermixed_args(argv[argv.index(command) + 1:])
    args.command, args.argv = command, argv
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ``pwself`` command line as the handlers get it (``SystemExit`` on a usage error, as argparse does);
    the README's commands are checked against it."""
    from pwself import __version__

    parser = argparse.ArgumentParser(prog="pwself", description="Patch-wise self-supervised pretraining of ViTs.")
    parser.add_argument("--version", action="version", version=f"pwself {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands():
        fmt = argparse.RawDescriptionHelpFormatter if command.raw else argparse.HelpFormatter
        p = sub.add_parser(command.name, help=command.help, description=command.description, formatter_class=fmt)
        command.add_arguments(p)
    return _parse(parser, sub, argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pwself`` command."""
    _setup_logging()
    try:
        args = parse_args(argv)
    except ValueError as e:  # a registered protocol or data kind that cannot join the commands
        print(f"pwself: error: {e}", file=sys.stderr)
        return 2
    handlers = {command.name: command.handler for command in commands()}
    from pwself.config import ConfigError
    from pwself.data import DatasetError
    from pwself.run.checkpoint import CheckpointError
    from pwself.run.folder import RunDirError, free_space
    from pwself.runtime import Preempted

    try:
        return handlers[args.command](args)
    except (ConfigError, DatasetError, CheckpointError, RunDirError, FileNotFoundError, ValueError,
            FloatingPointError, ImportError) as e:
        print(f"pwself {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a lost mount: one line naming the file and the space left
        if e.errno is None:  # not a write that failed (e.g. a library's own OSError): its message is the line
            print(f"pwself {args.command}: error: {e}", file=sys.stderr)
            return 2
        where = Path(e.filename).parent if e.filename else Path(".")
        print(f"pwself {args.command}: error: cannot write {e.filename or 'a file'} ({e.strerror}; "
              f"{free_space(where)} free in {where})", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM / SIGUSR1: the step finished and was checkpointed
        print(f"pwself {args.command}: {e}; {_continue_hint(args)}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"pwself {args.command}: interrupted; {_continue_hint(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
