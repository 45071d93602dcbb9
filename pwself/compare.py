"""Fair comparison of objectives: same data, backbone, views, budget and seeds; a table and a bar plot.

Runs go to ``OUT/<objective>_seed<seed>/`` one after the other; a run whose ``finished.json`` exists
is finished and skipped, an interrupted one resumes from its checkpoint. Each finished run is evaluated with
kNN (k = 10, 20 on the teacher features pooled as the objective says: the CLS token, or BagSSL's bag of
tiles), a linear probe and, given a dense dataset, the dense probe and Hummingbird retrieval; the results are
aggregated as mean ± std over seeds beside the random-init and raw-pixel floors of each protocol.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from pwself.config import ConfigError, TrainConfig, apply_overrides, config_to_dict
from pwself.eval.floors import DENSE_FLOORS, comparison_settings, pixel_dense_floor, pixel_floor, random_init_floor
from pwself.eval.protocols import PROTOCOLS, EvalData, evaluate
from pwself.eval.source import FeatureSource
from pwself.objectives import objective_overrides
from pwself.run.folder import RunFolder, RunInUseError

log = logging.getLogger(__name__)

__all__ = ["run_comparison", "run_name", "comparison_table", "plot_comparison", "extra_protocols"]

def _probe(cfg: TrainConfig, src: FeatureSource, protocol: str, progress: bool, dense: str | None = None) -> dict:
    """One protocol of a run's teacher (features cached in the run folder); ``dense``: the linear probe and
    Hummingbird retrieval on the same tokens."""
    settings = comparison_settings(dense, str(Path(cfg.out_dir) / "features"), progress)
    data = EvalData.of_run(cfg) if PROTOCOLS[protocol].features else None
    return evaluate(src, data, [protocol], settings)[protocol]


def _run_one(cfg: TrainConfig, progress: bool, dense: str | None = None, dense_id: str | None = None,
             protocols: list[str] = ()) -> dict[str, Any]:
    """Train (or reuse, or continue) one run, then its kNN, linear probe, (given a dense dataset) dense probe and
    any more ``protocols`` (their scores as columns); each result is kept in the run folder and read back on a
    rerun."""
    from functools import cache

    from pwself.experiment import open_teacher, run_experiment

    run_experiment(cfg, progress)
    run = RunFolder(cfg.out_dir)
    source = cache(lambda: open_teacher(run.path, cfg.device))  # opened once, and only when a probe has to run
    knn = run.read_json(RunFolder.KNN)["knn"]
    row = {"knn10": knn["10"]["top1"], "knn20": knn["20"]["top1"] if "20" in knn else float("nan"),
           "linear": run.cached_score("linear", lambda: _probe(cfg, source(), "linear", progress))["top1"]}
    if dense is not None:  # a score of an older pwself, without Hummingbird, is measured again
        res = run.cached_score("dense", lambda: _probe(cfg, source(), "dense", False, dense),
                               key=f"{dense_id}:{','.join(DENSE_FLOORS)}")
        row.update(miou=res["miou"], hbird_miou=res["hbird"]["miou"])
    for name in protocols:
        res = run.cached_score(name, lambda name=name: _probe(cfg, source(), name, progress))
        row.update(PROTOCOLS[name].scores(res))
    if source.cache_info().currsize:  # a probe ran now: the run's report shows its score
        from pwself.report import write_report

        write_report(run.path)
    return row


BUILT_IN_COLUMNS = ("knn", "linear", "dense")  # what every comparison (dense: with --dense) scores already


def extra_protocols(names: list[str]) -> list[str]:
    """``compare --protocols``: registered protocols beyond kNN, linear and dense, checked before any run."""
    unknown = [p for p in names if p not in PROTOCOLS or p in BUILT_IN_COLUMNS]
    if unknown:
        raise ValueError(f"--protocols {','.join(names)}: {', '.join(unknown)} is not an extra protocol; use "
                         f"{', '.join(p for p in PROTOCOLS if p not in BUILT_IN_COLUMNS)} (kNN and linear always "
                         "run; the dense protocols with --dense DIR)")
    return names


def run_name(label: str, seed: int | str) -> str:
    """The folder of one (objective label, seed) run inside a comparison's output folder."""
    return f"{label.replace(':', '_').replace('=', '-').replace('+', '_')}_seed{seed}"


def run_comparison(
    base: TrainConfig, objectives: list[str], seeds: list[int], out_dir: str | Path, progress: bool = True,
    dense: str | None = None, runs_only: bool = False, protocols: list[str] = (),
) -> dict[str, Any]:
    """Train and evaluate every (objective, seed); only ``loss.objective`` and ``seed`` differ between runs.

    An objective may carry overrides after a colon, e.g. ``pwml:photometric.mode=none`` or
    ``pwml:loss.matcher=feature-nn`` (several separated by ``+``); the label is the whole string. With
    ``dense`` (a dense dataset folder) every run, the random init and raw pixels also get the dense probe.
    ``runs_only`` stops after the runs (no floors, table or plot): workers in parallel, collected later.
    ``protocols``: more protocols (:data:`pwself.eval.protocols.PROTOCOLS`) scored on every run, at their
    defaults; their ``scores`` become columns.
    """
    from pwself.data import scorable

    out_dir = Path(out_dir)
    if not scorable(base.data):
        raise ConfigError(f"compare scores every run by kNN and a linear probe on labelled held-out images, and "
                          f"data.root={base.data.root} has none (unlabelled images, or no val/ or test/ folder): add "
                          "train/CLASS/ and val/CLASS/ folders, or train each objective with pwself pretrain")
    results: dict[str, Any] = {"objectives": objectives, "seeds": seeds, "runs": {}}
    if dense is not None:
        results["dense_data"] = str(dense)
    if protocols:
        results["protocols"] = list(protocols)
    plan = []  # every run's config, checked before any trains
    for label in objectives:
        objective, _, extra = label.partition(":")
        overrides = objective_overrides(objective) + [o for o in extra.split("+") if o]
        for seed in seeds:
            # eval.knn_floors off: the comparison computes each floor once for all its runs
            cfg = apply_overrides(base, [*overrides, f"seed={seed}", f"out_dir={out_dir / run_name(label, seed)}",
                                         "eval.knn_at_end=true", "eval.knn_floors=false"])
            try:
                cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"--objectives entry {label!r}: {e}") from None
            plan.append((label, seed, cfg))
    if dense is not None:
        from pwself.data.dense import dense_key

        dense_id = dense_key(dense)  # read once: it hashes both splits' files
    else:
        dense_id = None
    for label, seed, cfg in plan:
        try:
            results["runs"].setdefault(label, {})[str(seed)] = _run_one(cfg, progress, dense, dense_id, protocols)
        except RunInUseError:
            if not runs_only:
                raise
            log.info("%s is being trained by another worker: on to the next run", cfg.out_dir)
    if runs_only:
        return results
    results["config"] = config_to_dict(base)
    results["pixel_floor"] = pixel_floor(base, out_dir / "pixel_floor.json", linear=True)
    if results["pixel_floor"] is not None and dense is not None:
        pixel_dense = pixel_dense_floor(base, dense, out_dir / "pixel_dense_floor.json")
        results["pixel_floor"].update(miou=pixel_dense["miou"], hbird_miou=pixel_dense["hbird_miou"])
    floors = {str(seed): random_init_floor(apply_overrides(base, [f"seed={seed}"]),
                                           out_dir / f"random_init_seed{seed}.json", dense=dense) for seed in seeds}
    if all(floors.values()):
        results["random_init"] = floors
    (out_dir / "comparison.json").write_text(json.dumps(results, indent=2))
    (out_dir / "comparison.md").write_text(comparison_table(results))
    plot_comparison(results, out_dir / "comparison.png")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, header) of the table's score columns: kNN and linear, and the dense probe when it was run."""
    cols = [("knn10", "kNN k=10"), ("knn20", "kNN k=20"), ("linear", "linear")]
    runs = [r for per_seed in results["runs"].values() for r in per_seed.values()]
    dense = [("miou", "dense mIoU"), ("hbird_miou", "Hummingbird mIoU")]
    cols += [(k, h) for k, h in dense if runs and all(k in r for r in runs)]
    named = {k for k, _ in cols}  # then the scores of the more protocols, as each names them
    extra = dict.fromkeys(k for r in runs for k in r if k not in named and k not in ("knn10", "knn20", "linear"))
    return cols + [(k, k) for k in extra if all(k in r for r in runs)]


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: one row per objective, mean ± std over seeds of kNN k=10, k=20, linear top-1 (and dense
    mIoU), then the random-init and raw-pixel floors."""
    seeds, cols = results["seeds"], _columns(results)
    over = f"Mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"Seed {seeds[0]}"
    lines = [f"{over}; top-1 % (mIoU %) on the held-out split (val/ or test/).", "",
             "| objective | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, per_seed in results["runs"].items():
        lines.append(f"| {label} | " + _cells(per_seed, cols) + " |")
    if results.get("random_init"):
        lines.append("| *random init (same backbone, CLS)* | " + _cells(results["random_init"], cols) + " |")
    floor = results.get("pixel_floor")
    if floor:
        cells = [f"{floor[k]:.2f}" if k in floor else "—" for k, _ in cols]
        lines.append("| *raw pixels (floor)* | " + " | ".join(cells) + " |")
    if results.get("dense_data"):
        lines += ["", f"Dense probe on {results['dense_data']}: a linear layer on each patch token (on each "
                  "patch's pixels for the floor), logits upsampled to the mask; Hummingbird: each test patch "
                  "labelled by its 30 most similar train patches, no training (docs/evaluation.md)."]
    return "\n".join(lines) + "\n"


def _cells(per_seed: dict[str, dict[str, float]], cols: list[tuple[str, str]]) -> str:
    """``mean ± std`` over seeds of each column's score, as table cells (— where a row lacks it)."""
    cells = []
    for key, _ in cols:
        values = [r[key] for r in per_seed.values() if key in r]
        if len(values) < len(per_seed):
            cells.append("—")
            continue
        m, s = _mean_std(values)
        cells.append(f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}")  # one seed has no spread to show
    return " | ".join(cells)


def _tick_label(label: str) -> str:
    """An objective label for an axis: the objective, then one override a line, long ones broken after ``=``."""
    objective, _, extra = label.partition(":")
    lines = [objective]
    for override in filter(None, extra.split("+")):
        key, eq, value = override.partition("=")
        lines += [key + eq, value] if len(override) > 16 and eq else [override]
    return "\n".join(lines)


def _floor_lines(ax, results: dict[str, Any], key: str, name: str, color) -> list[float]:  # noqa: ANN001
    """The raw-pixel (dashed) and random-init (dotted) floors of one score as lines in its bars' colour."""
    shown = []
    floor = results.get("pixel_floor") or {}
    if key in floor:
        ax.axhline(floor[key], color=color, linestyle="--", linewidth=1.2, label=f"raw pixels, {name}")
        shown.append(floor[key])
    rows = list((results.get("random_init") or {}).values())
    if rows and all(key in r for r in rows):
        m, _ = _mean_std([r[key] for r in rows])
        ax.axhline(m, color=color, linestyle=":", linewidth=1.2, label=f"random init, {name}")
        shown.append(m)
    return shown


def _bar_panel(ax, results: dict[str, Any], scores: list[tuple[str, str]], ylabel: str) -> None:  # noqa: ANN001
    """Grouped bars (mean ± std over seeds) of ``scores`` per objective, with their floors."""
    labels = list(results["runs"])
    width = 0.8 / len(scores)
    shown = []
    for k, (key, name) in enumerate(scores):
        stats = [_mean_std([r[key] for r in results["runs"][lab].values()]) for lab in labels]
        xs = [i + (k - (len(scores) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m, _ in stats], padding=2, fontsize=7)
        shown += [m for m, _ in stats] + _floor_lines(ax, results, key, name, bars.patches[0].get_facecolor())
    if shown:
        ax.set_ylim(max(0.0, 5 * (min(shown) // 5) - 5), min(100.0, max(shown) + 4))
    ax.set_xticks(range(len(labels)), [_tick_label(lab) for lab in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def plot_comparison(results: dict[str, Any], path: str | Path) -> Path:
    """Grouped bar plot (kNN k=10 and linear; the dense probe's mIoU in a panel of its own when it was run)
    with std error bars, values on the bars, and the floors (raw pixels, random init) as horizontal lines;
    the y range fits the values so that gaps of a point show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = ("miou", "dense mIoU") in _columns(results)
    n = len(results["runs"])
    fig, axes = plt.subplots(1, 2 if dense else 1, figsize=(max(6, 1.4 * n + 3) * (1.8 if dense else 1), 4.8),
                             squeeze=False)
    _bar_panel(axes[0, 0], results, [("knn10", "kNN k=10"), ("linear", "linear")], "top-1 % (held-out)")
    if dense:
        scores = [c for c in _columns(results) if c[0] in ("miou", "hbird_miou")]
        _bar_panel(axes[0, 1], results, scores, "mIoU % (test)")
    fig.suptitle(f"objectives, same budget, {len(results['seeds'])} seed(s) each: mean ± std", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
