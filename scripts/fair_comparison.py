"""The fair comparison (issue 17, RESULTS.md): every method tuned with the same budget, then compared on fresh seeds.

1. ``pwself tune`` for each method: ``--trials`` settings of its own knobs (:data:`SPACES`), each trained for the
   base config's budget and scored by kNN on held-out *train* images (the test split is never read).
2. ``pwself compare`` of each method at its chosen setting on ``--seeds`` (not the tuning seed, so a setting
   that won on one seed's luck gets no second helping), kNN and linear probe on test, beside the random-init
   and raw-pixel floors.
3. Each method's own claim at this scale. LoGo and CO-SSL are additions to DINO: besides their tuned rows,
   they run with their chosen knob on DINO's chosen recipe, beside DINO at the shared recipe they were tuned
   on (:func:`claim_labels`). BagSSL: CLS against its bag pooling of the same runs (``eval-knn``).

Every method's trials land side by side in ``OUT/tuning.md``, the choices in ``OUT/chosen.json``.

Trials and runs are independent, so they run ``--jobs`` at a time as separate ``pwself`` processes sharing one
output folder (a GPU takes many of these small models at once); finished work is read back on a rerun.

    python scripts/fair_comparison.py --out runs/fair --jobs 2                # CPU: hours
    python scripts/fair_comparison.py --out runs/fair --jobs 16 --device cuda # one GPU: minutes

With ``--dense DIR`` it is the dense study (issue 26): the dense objectives (:data:`DENSE_METHODS`) on the
scenes, each trial scored by the dense probe's mIoU on held-out images of ``DIR/train`` (``tune --select
miou``), and the compared runs get the dense probe on test beside kNN and linear:

    pwself make-scenes data/scenes
    python scripts/fair_comparison.py --dense data/scenes --out runs/fair_dense --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pwself.compare import run_name

# Each method's own knobs, the same number of trials each. DINO and PW-Self (whose shared recipe was searched
# before) get the lr and teacher temperature; the related methods get the knob their paper adds, at the
# paper's value among the choices where the paper gives one (LoGo lambda 1e-4, CO-SSL's own local head,
# BagSSL's fixed-scale patch views).
# The dense objectives share DINO's grid: the same trials for every method of the dense question.
BAG_VIEWS = ["views.n_local=0", "views.global_size=14", "views.global_scale=[0.25,0.25]"]
LR_TEMP = ["optim.lr=2e-3,4e-3", "loss.teacher_temp=0.02,0.04"]
SPACES: dict[str, list[str]] = {
    "dino": LR_TEMP,
    "pwml": LR_TEMP,
    "logo": ["objectives.logo.weight=1e-4,1e-2,0.1,1"],
    "cossl": ["objectives.cossl.weight=0.5,1", "head.patch_head=shared,separate"],
    "bagssl": [*BAG_VIEWS, "views.n_global=4,8", "optim.lr=2e-3,4e-3"],
    "ibot": LR_TEMP,
    "dinov2_ema": LR_TEMP,  # the recipe the dense study measured (named dinov2 before issue 39)
    "pwml_ibot": LR_TEMP,
}
KNN_METHODS = ["dino", "pwml", "logo", "cossl", "bagssl"]
DENSE_METHODS = ["dino", "ibot", "dinov2_ema", "pwml", "pwml_ibot"]


def _pwself(*args: str) -> list[str]:
    return [sys.executable, "-m", "pwself.cli", *args]


def _run_all(commands: list[tuple[str, list[str]]], jobs: int, logs: Path) -> None:
    """Run ``(name, argv)`` commands ``jobs`` at a time, each logged to ``logs/name.log``; stop on a failure."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}

    def run(item: tuple[str, list[str]]) -> tuple[str, int]:
        name, argv = item
        with open(logs / f"{name}.log", "w") as log:
            return name, subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    t0 = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        failed = [name for name, rc in pool.map(run, commands) if rc != 0]
    print(f"{len(commands)} jobs in {time.time() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs in {logs})")


def tune_all(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """Every method's trials in parallel, then each method's choice; returns each method's ``tune.json``."""
    common = ["--trials", str(args.trials), "--config", args.config, "--no-progress", *args.device_flag]
    if args.dense:
        common += ["--select", "miou", "--dense", args.dense]
    work = [(f"tune_{m}_{i}", _pwself("tune", "--objective", m, "--out-dir", str(out / "tune" / m), "--trial",
                                      str(i), *common, *SPACES[m]))
            for i in range(args.trials) for m in args.methods]
    _run_all(work, args.jobs, out / "logs")
    _run_all([(f"tune_{m}", _pwself("tune", "--objective", m, "--out-dir", str(out / "tune" / m), *common, *SPACES[m]))
              for m in args.methods], args.jobs, out / "logs")
    return {m: json.loads((out / "tune" / m / "tune.json").read_text()) for m in args.methods}


def tuning_markdown(results: dict[str, dict]) -> str:
    """Every method's held-out score per setting side by side (methods sharing a grid share rows), each
    method's choice in bold: how much the choice matters, and whether the methods want the same setting."""
    def label(setting: dict[str, str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in setting.items())

    rows: dict[str, dict[str, str]] = {}
    for m, r in results.items():
        key, best = r["score_key"], label(r["best"]["setting"])
        for t in r["trials"]:
            setting, cell = label(t["setting"]), f"{t[key]:.2f}"
            rows.setdefault(setting, {})[m] = f"**{cell}**" if setting == best else cell
    lines = ["| setting | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {s} | " + " | ".join(cells.get(m, "") for m in results) + " |" for s, cells in sorted(rows.items())]
    return "\n".join(lines) + "\n"


def claim_labels(labels: dict[str, str]) -> dict[str, str]:
    """The runs that test "X beats the DINO it is added to": DINO at the shared recipe, and LoGo / CO-SSL with
    their chosen knob on DINO's chosen recipe (empty when DINO or both additions are not among the methods)."""
    if "dino" not in labels or not {"logo", "cossl"} & set(labels):
        return {}
    dino = labels["dino"].partition(":")[2]
    extra = {"dino_shared": "dino"}
    for m in ("logo", "cossl"):
        if m in labels:
            own = labels[m].partition(":")[2]
            extra[f"{m}_on_dino"] = f"{m}:" + "+".join(x for x in (dino, own) if x)
    return extra


def compare_all(args: argparse.Namespace, out: Path, labels: dict[str, str]) -> None:
    """Every (method, seed) run in parallel, then one collecting ``compare`` for the table, floors and plot."""
    common = ["--config", args.config, "--out-dir", str(out / "compare"), "--no-progress", *args.device_flag]
    common += ["--dense", args.dense] if args.dense else []
    # Seed by seed: a study stopped part-way leaves every method at the same seeds, a fair table already.
    work = [(f"run_{m}_{s}", _pwself("compare", "--objectives", label, "--seeds", s, "--runs-only", *common))
            for s in args.seeds.split(",") for m, label in labels.items()]
    _run_all(work, args.jobs, out / "logs")
    _run_all([("compare", _pwself("compare", "--objectives", ",".join(labels.values()), "--seeds", args.seeds,
                                  *common))], 1, out / "logs")


def pooling_claims(args: argparse.Namespace, out: Path, labels: dict[str, str]) -> None:
    """kNN of the same runs with CLS and with BagSSL's bag pooling (its claim: the bag is the better image
    representation, also of other methods' runs)."""
    if "bagssl" not in labels:
        return
    runs = [str(out / "compare" / run_name(label, s))
            for m, label in labels.items() if m in ("bagssl", "dino", "pwml") for s in args.seeds.split(",")]
    if runs:
        _run_all([("pooling", _pwself("eval-knn", *runs, "--pooling", "cls,bag", "--no-progress",
                                      "--output", str(out / "pooling"), *args.device_flag))], 1, out / "logs")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fair")
    p.add_argument("--config", help="base config: the budget every trial and run gets (default fmnist_compare, "
                   "with --dense fmnist_scenes)")
    p.add_argument("--methods", help=f"from {', '.join(SPACES)} (default {','.join(KNN_METHODS)}, with --dense "
                   f"{','.join(DENSE_METHODS)})")
    p.add_argument("--dense", metavar="DIR", help="the dense study on this pwself make-scenes folder: trials chosen "
                   "by held-out dense mIoU, runs scored by the dense probe too")
    p.add_argument("--trials", type=int, default=4, help="trials per method (the same for every method)")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the compared runs (tuning used the config's seed)")
    p.add_argument("--jobs", type=int, default=2, help="trials or runs at a time")
    p.add_argument("--device", help="cpu, cuda, ... (default: the config's, auto)")
    args = p.parse_args(argv)
    args.config = args.config or ("fmnist_scenes" if args.dense else "fmnist_compare")
    methods = args.methods or ",".join(DENSE_METHODS if args.dense else KNN_METHODS)
    args.methods = [m for m in methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(SPACES))
    if unknown:
        raise SystemExit(f"--methods {','.join(unknown)}: not in {', '.join(SPACES)}")
    args.device_flag = ["--device", args.device] if args.device else []
    out = Path(args.out)
    results = tune_all(args, out)
    labels = {m: r["compare_label"] for m, r in results.items()}
    table = tuning_markdown(results)
    (out / "tuning.md").write_text(table)
    (out / "chosen.json").write_text(json.dumps(labels, indent=2))
    print(table + "\nchosen:", json.dumps(labels, indent=2), flush=True)
    compare_all(args, out, {**labels, **claim_labels(labels)})
    pooling_claims(args, out, labels)
    print((out / "compare" / "comparison.md").read_text())


if __name__ == "__main__":
    main()
