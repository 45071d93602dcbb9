"""Batch 32: the shipped settings against the small-batch recipe (issue 44, RESULTS.md "Small batches").

Two data sets, each with its shipped config: Fashion-MNIST (``fmnist_demo``: kNN k = 10 on the 10k test images
with the 60k train bank) and the scenes (``fmnist_scenes``: the dense linear probe of ``data/scenes``). Every row
sees the same images as the shipped batch-64 run (the same epochs, so twice its steps) and differs from it only in
the keys it names:

- ``default``: ``batch_size=32`` alone. The peak lr follows DINO's linear rule (``lr × 32 / 256``), half of batch
  64's; the teacher momentum and the centre momentum are per step, so their memory in images halves.
- ``recipe``: ``batch_size=32`` and the small-batch recipe of ``docs/guide.md`` ("Small batches"): the same memory
  in images for the teacher and the centre (``m → m ** (32 / 64)``) and the lr by the square root of the batch
  ratio rather than linearly.

    pwself make-scenes data/scenes
    python scripts/small_batch_study.py --out runs/small_batch --jobs 2      # 2 CPU cores: about 30 minutes

Finished runs are read back on a rerun; ``--collect`` only writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pwself.run.folder import RunFolder

SHIPPED_BATCH = 64
BATCH = 32
DATASETS = {  # name -> (config, its shipped optim.lr, teacher momentum, overrides of every row)
    "fmnist": ("fmnist_demo", 4.0e-3, 0.99, ["eval.knn_floors=false"]),
    "scenes": ("fmnist_scenes", 4.0e-3, 0.99, ["eval.knn_floors=false", "eval.dense_data=data/scenes",
                                               "eval.dense_every_epochs=4"]),
}
CENTER_MOMENTUM = 0.9


def small_batch_recipe(lr: float, momentum_teacher: float, batch: int, reference_batch: int) -> list[str]:
    """The keys that move a recipe tuned at ``reference_batch`` to ``batch``: EMA momenta with the same memory in
    images, the peak lr by the square root of the batch ratio (``optim.lr`` is per 256 images, scaled linearly)."""
    ratio = batch / reference_batch
    peak = lr * reference_batch / 256 * math.sqrt(ratio)
    return [f"batch_size={batch}", f"optim.lr={peak * 256 / batch:.4g}",
            f"optim.momentum_teacher={momentum_teacher ** ratio:.5g}",
            f"loss.center_momentum={CENTER_MOMENTUM ** ratio:.4g}"]


def rows(dataset: str) -> dict[str, list[str]]:
    _, lr, m, _ = DATASETS[dataset]
    return {"default": [f"batch_size={BATCH}"], "recipe": small_batch_recipe(lr, m, BATCH, SHIPPED_BATCH)}


def run_one(out: Path, dataset: str, row: str, seed: int) -> Path:
    config, _, _, common = DATASETS[dataset]
    run = out / dataset / f"{row}_s{seed}"
    if not RunFolder(run).finished.exists():
        run.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(f"{run}.log", "a") as f:
            rc = subprocess.run([sys.executable, "-m", "pwself.cli", "pretrain", "--config", config, *common,
                                 *rows(dataset)[row], f"seed={seed}", "--out-dir", str(run), "--auto-resume",
                                 "--no-progress"], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            raise SystemExit(f"{run} failed (rc {rc}): see {run}.log")
    return run


def score(run: Path, dataset: str) -> dict[str, float]:
    """The row's score (kNN top-1 or dense mIoU, %), the final teacher entropy relative to log K, and whether a
    collapse warning was written."""
    metrics = [json.loads(line) for line in RunFolder(run).metrics.read_text().splitlines()]
    last = [m for m in metrics if "teacher_entropy_rel" in m][-1]
    if dataset == "fmnist":
        value = RunFolder(run).read_json(RunFolder.KNN)["knn"]["10"]["top1"]
    else:
        value = json.loads(RunFolder(run).dense_history.read_text().splitlines()[-1])["miou"]
    warned = "looks collapsed" in Path(f"{run}.log").read_text().lower()
    return {"score": value, "entropy": last["teacher_entropy_rel"], "rank": last.get("rank_cls", float("nan")),
            "warned": warned}


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| data (score) | batch 32 | keys | score per seed | mean | teacher entropy / log K | CLS rank | "
             "collapse warning |", "|---|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        what = "kNN k=10 %" if dataset == "fmnist" else "dense mIoU %"
        for row, keys in rows(dataset).items():
            done = [score(out / dataset / f"{row}_s{s}", dataset) for s in seeds
                    if RunFolder(out / dataset / f"{row}_s{s}").finished.exists()]
            if not done:
                continue
            per_seed = " / ".join(f"{d['score']:.2f}" for d in done)
            mean = statistics.mean(d["score"] for d in done)
            lines.append(f"| {dataset} ({what}) | {row} | `{' '.join(keys)}` | {per_seed} | {mean:.2f} | "
                         f"{statistics.mean(d['entropy'] for d in done):.2f} | "
                         f"{statistics.mean(d['rank'] for d in done):.1f} | "
                         f"{'yes' if any(d['warned'] for d in done) else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/small_batch")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--collect", action="store_true", help="only write the table of what is finished")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            jobs = [pool.submit(run_one, out, d, r, s) for s in seeds for d in DATASETS for r in rows(d)]
            for job in jobs:
                job.result()
    md = table(out, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "small_batch.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
