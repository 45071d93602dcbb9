"""Post-training a "released" backbone on the scenes (issue 41, RESULTS.md "Post-training a started backbone").

No weights can be downloaded here, so the stand-in for a released model is made first: a backbone pretrained
CLS-only (DINO) on Fashion-MNIST (``fmnist_demo`` with ``loss.objective=dino``), its teacher exported as a timm
file. Each family (``plain``: timm's plain ViT; ``reg4``: ``vit_small_patch14_reg4_dinov2`` shrunk to the same
sizes, with its 4 registers and layer scale) gets its own stand-in. Then each method post-trains it on the scenes
(``fmnist_scenes``, a new DINO head) for the same number of steps, with and without a head warm-up, on three
seeds; every run is scored by the dense probe on the scenes (what post-training is for) and kNN on Fashion-MNIST
(what it kept). The starting model gets the same scores at the same input size (its row).

    pwself make-scenes data/scenes
    python scripts/posttrain_study.py --out runs/post --jobs 2      # CPU: about an hour

Finished work is read back on a rerun; ``--collect`` only writes the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pwself.run.folder import RunFolder

FMNIST = "/usr/share/datasets/fashion-mnist"
FAMILIES = {
    "plain": [],
    "reg4": ["backbone.name=vit_small_patch14_reg4_dinov2",
             "backbone.model_args={patch_size: 7, embed_dim: 128, depth: 4, num_heads: 4}"],
}
METHODS = {  # label -> overrides of the post-training run
    "dino": ["loss.objective=dino"],
    "ibot": ["loss.objective=ibot"],
    "pwml": ["loss.objective=pwml"],
    "pwml+gram": ["loss.objective=pwml", "loss.gram_weight=1.0"],
}
WARMUP = {"warm-up": ["optim.head_warmup_epochs=0.25"], "no warm-up": ["optim.head_warmup_epochs=0"]}
# The post-training budget: one pass over the 10000 scenes (156 steps of 64), lr warm-up a quarter of it.
POST = ["epochs=1", "optim.warmup_epochs=0.25", "eval.knn_floors=false", "eval.dense_data=data/scenes",
        "eval.dense_every_epochs=1"]
SEEDS = (1, 2, 3)
# What the registers family runs: the main rows.
REG4_RUNS = [("dino", "no warm-up"), ("pwml", "warm-up"), ("pwml", "no warm-up"), ("pwml+gram", "warm-up")]


class InUse(Exception):
    """Another study process is training this run (``--seeds`` in another order shares the work)."""


def pwself(*args: str, log: Path) -> None:
    """One pwself command, its output in ``log``; stops the study when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "-m", "pwself.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc and "is in use by another pwself run" in log.read_text()[start:]:
        raise InUse(args)
    if rc:
        raise SystemExit(f"pwself {' '.join(args)} failed (rc {rc}): see {log}")


def start_model(out: Path, family: str) -> Path:
    """The stand-in for a released backbone: DINO on Fashion-MNIST, its teacher backbone as a timm file."""
    run = RunFolder(out / f"start_{family}")
    if not run.finished.exists():
        pwself("pretrain", "--config", "fmnist_demo", "loss.objective=dino", *FAMILIES[family], "--out-dir", str(run),
               "--auto-resume", "--no-progress", log=out / f"start_{family}.log")
    return run.backbone


def fmnist_knn(run: Path, log: Path) -> None:
    """kNN (k = 10) on Fashion-MNIST, 60k bank, of a run's teacher at its own input size: what was kept."""
    if not (run / "fmnist_knn.json").exists():
        pwself("eval-knn", str(run), "--data-kind", "idx", "--data-root", FMNIST, "--ks", "10", "--cache-dir", "",
               "--no-progress", "--output", str(run / "fmnist_knn"), log=log)


def start_row(out: Path, family: str, weights: Path) -> Path:
    """The starting model as post-training sees it (the scenes config, position embeddings resampled to its
    input side), saved as a run folder without checkpoints, and scored like the post-trained runs."""
    import torch

    from pwself.config import load_config, save_config
    from pwself.data import channel_stats, open_dataset
    from pwself.init_weights import load_backbone_weights
    from pwself.models import make_vit
    from pwself.run.checkpoint import export_backbone

    folder = out / family / "start"
    folder.mkdir(parents=True, exist_ok=True)
    if not RunFolder(folder).backbone.exists():
        cfg = load_config("fmnist_scenes", [*FAMILIES[family], *POST, f"backbone.init={weights}"])
        cfg.data.mean, cfg.data.std = channel_stats(open_dataset(cfg.data, "train", 1, cfg.backbone.patch_size, 0))
        torch.manual_seed(0)
        backbone = make_vit(cfg.backbone, cfg.views.global_size)
        load_backbone_weights(backbone, weights)
        save_config(cfg, RunFolder(folder).config)
        export_backbone(backbone, RunFolder(folder).backbone)
    log = out / family / "start.log"
    if not (folder / "start_dense.json").exists():  # eval-dense's output, beside the run's own files
        pwself("eval-dense", str(folder), "--data", "data/scenes", "--cache-dir", "", "--no-progress", "--output",
               str(folder / "start_dense"), log=log)
    fmnist_knn(folder, log)
    if not (folder / "scenes_knn.json").exists():  # the post-trained runs' own kNN: the scenes' dominant class
        pwself("eval-knn", str(folder), "--ks", "10", "--cache-dir", "", "--no-progress", "--output",
               str(folder / "scenes_knn"), log=log)
    return folder


def post_run(out: Path, family: str, weights: Path, method: str, warmup: str, seed: int) -> Path | None:
    """One post-training run and its Fashion-MNIST kNN; ``None`` when another study process has it."""
    run = out / family / f"{method}_{warmup.replace(' ', '')}_s{seed}"
    log = Path(f"{run}.log")
    try:
        if not RunFolder(run).finished.exists():
            pwself("pretrain", "--config", "fmnist_scenes", *FAMILIES[family], *POST, f"backbone.init={weights}",
                   *METHODS[method], *WARMUP[warmup], f"seed={seed}", "--out-dir", str(run), "--auto-resume",
                   "--no-progress", log=log)
        fmnist_knn(run, log)
    except InUse:
        return None
    return run


def scores(run: Path) -> dict[str, float | None]:
    """Dense mIoU on the scenes, kNN on the scenes' dominant class (post-trained runs) and on Fashion-MNIST
    (k = 10, %)."""
    by_pooling = json.loads((run / "fmnist_knn.json").read_text())["knn"]
    fmnist = next(iter(next(iter(by_pooling.values())).values()))["10"]["top1"]  # the one pooling, the one model
    if (run / "start_dense.json").exists():  # the start row: eval-dense's output, one model
        miou = next(iter(json.loads((run / "start_dense.json").read_text())["dense"].values()))["miou"]
        scenes = None
        if (run / "scenes_knn.json").exists():
            by_pooling = json.loads((run / "scenes_knn.json").read_text())["knn"]
            scenes = next(iter(next(iter(by_pooling.values())).values()))["10"]["top1"]
        return {"miou": miou, "fmnist_knn": fmnist, "scenes_knn": scenes}
    miou = RunFolder(run).dense_history.read_text().splitlines()[-1]
    miou = json.loads(miou)["miou"]
    scenes = RunFolder(run).read_json(RunFolder.KNN)["knn"]["10"]["top1"]
    return {"miou": miou, "fmnist_knn": fmnist, "scenes_knn": scenes}


def table(out: Path) -> str:
    """Markdown: one row per family, method and warm-up, mean ± std over the seeds, the start row first."""
    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    lines = ["| family | post-training | head warm-up | dense mIoU (scenes) | kNN scenes | kNN Fashion-MNIST | "
             "per seed dense mIoU |", "|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        start = out / family / "start"
        if (start / "fmnist_knn.json").exists():
            s = scores(start)
            scenes = f"{s['scenes_knn']:.2f}" if s["scenes_knn"] is not None else "—"
            lines.append(f"| {family} | *starting model* | — | {s['miou']:.2f} | {scenes} | {s['fmnist_knn']:.2f} | |")
        for method in METHODS:
            for warmup in WARMUP:
                runs = [out / family / f"{method}_{warmup.replace(' ', '')}_s{s}" for s in SEEDS]
                done = [scores(r) for r in runs if (r / "fmnist_knn.json").exists()]
                if not done:
                    continue
                per_seed = " / ".join(f"{d['miou']:.2f}" for d in done)
                lines.append(f"| {family} | {method} | {warmup} | {cell([d['miou'] for d in done])} | "
                             f"{cell([d['scenes_knn'] for d in done])} | {cell([d['fmnist_knn'] for d in done])} | "
                             f"{per_seed} |")
    return "\n".join(lines)


def plot(out: Path, path: Path) -> None:
    """Dense mIoU (what post-training is for) and Fashion-MNIST kNN (what it kept) of every row: mean ± std (blue:
    with head warm-up, orange: without), the seeds as dots, the starting model as a line; a panel pair a family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(FAMILIES), 2, figsize=(12, 3.4 * len(FAMILIES)), squeeze=False)
    for row, family in enumerate(FAMILIES):
        start = out / family / "start"
        if not (start / "fmnist_knn.json").exists():
            continue
        s0 = scores(start)
        labels, runs = [], []
        for method in METHODS:
            for warmup in WARMUP:
                done = [scores(r) for r in (out / family / f"{method}_{warmup.replace(' ', '')}_s{k}" for k in SEEDS)
                        if (r / "fmnist_knn.json").exists()]
                if done:
                    labels.append((method, warmup))
                    runs.append(done)
        for col, (key, title) in enumerate((("miou", "dense mIoU on the scenes (%)"),
                                            ("fmnist_knn", "kNN k=10 on Fashion-MNIST (%): kept"))):
            ax = axes[row, col]
            for i, done in enumerate(runs):  # points, not bars: the axis does not start at 0
                values = [d[key] for d in done]
                color = "tab:blue" if labels[i][1] == "warm-up" else "tab:orange"
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.errorbar(i, statistics.mean(values), yerr=sd, fmt="o", color=color, capsize=4, ms=7)
                ax.plot([i] * len(values), values, ".", color="k", ms=3)
            ax.axhline(s0[key], color="k", ls="--", lw=1, label="starting model")
            lo = min([s0[key], *(d[key] for done in runs for d in done)])
            hi = max([s0[key], *(d[key] for done in runs for d in done)])
            ax.set_ylim(lo - 0.6 * (hi - lo) - 0.2, hi + 0.3 * (hi - lo) + 0.2)
            ax.set_xticks(range(len(labels)), [f"{m}\n{w}" for m, w in labels], fontsize=7)
            ax.set_title(f"{family}: {title}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/post")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--collect", action="store_true", help="only write the table of what is finished")
    ap.add_argument("--families", default="plain,reg4")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                    help="seeds in the order to run them; a second process with another order shares the work")
    ap.add_argument("--reverse", action="store_true", help="each seed's runs in reverse order")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.families.split(",")
    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            weights = dict(zip(families, pool.map(lambda f: start_model(out, f), families)))
            jobs = [pool.submit(start_row, out, f, weights[f]) for f in families]
            for seed in map(int, args.seeds.split(",")):  # seed by seed: a study stopped part-way leaves every row
                for family in families:                   # at the same seeds
                    pairs = [(m, w) for m in METHODS for w in WARMUP] if family == "plain" else REG4_RUNS
                    pairs = pairs[::-1] if args.reverse else pairs
                    jobs += [pool.submit(post_run, out, family, weights[family], m, w, seed) for m, w in pairs]
            for job in jobs:
                job.result()
    md = table(out)
    (out / "posttrain.md").write_text(md + "\n")
    plot(out, out / "posttrain.png")
    print(md)


if __name__ == "__main__":
    main()
