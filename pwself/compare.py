"""Fair comparison of objectives: same data, backbone, views, budget and seeds; a table and a bar plot.

Runs go to ``OUT/<objective>_seed<seed>/`` one after the other; a run whose ``knn.json`` exists is
finished and skipped, an interrupted one resumes from its checkpoint. Each finished run is evaluated with
kNN (k = 10, 20 on the teacher features pooled as the objective says: the CLS token, or BagSSL's bag of
tiles) and a linear probe, and the results are aggregated as mean ± std over seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pwself.checkpoint import latest_checkpoint
from pwself.config import TrainConfig, apply_overrides

__all__ = ["run_comparison", "comparison_table", "plot_comparison", "pixel_floor", "random_init_floor"]

MAX_PIXEL_DIM = 16384  # above this (e.g. 3 x 74 x 74) a raw-pixel kNN is too slow to be a side result


def _open(cfg: TrainConfig, split: str):  # noqa: ANN202 - a torch Dataset
    from pwself.data import open_dataset

    return open_dataset(cfg.data, split, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)


def pixel_floor(cfg: TrainConfig, cache: Path) -> dict[str, float] | None:
    """kNN (k = 10, 20) of raw, L2-normalized pixels with the same bank and queries as the runs: the floor
    that learned features must beat. ``None`` for unlabelled data or images above :data:`MAX_PIXEL_DIM`."""
    import torch
    import torch.nn.functional as F

    from pwself.data import iterate_batches
    from pwself.eval.knn import knn_classify

    if cache.exists():
        return json.loads(cache.read_text())
    train = _open(cfg, "train")
    image, label = train[0]
    if image.numel() > MAX_PIXEL_DIM or int(label) < 0:  # too large for a side result, or unlabelled
        return None
    data = {}
    for split, ds in (("train", train), ("test", _open(cfg, "test"))):
        images, labels = zip(*iterate_batches(ds, list(torch.arange(len(ds)).split(1024)), cfg.data.num_workers))
        data[split] = (F.normalize(torch.cat(images).flatten(1).float(), dim=1), torch.cat(labels))
    if (data["train"][1] < 0).any() or (data["test"][1] < 0).any():
        return None
    knn = knn_classify(*data["train"], *data["test"], ks=(10, 20))
    floor = {"knn10": knn[10]["top1"], "knn20": knn[20]["top1"]}
    cache.write_text(json.dumps(floor))
    return floor


def random_init_floor(cfg: TrainConfig, cache: Path, linear: bool = True) -> dict[str, float] | None:
    """kNN (k = 10, 20) and (with ``linear``) linear probe of the configured backbone at its random
    initialization (the same init a run with ``cfg.seed`` starts from), CLS features at the global view size:
    what pretraining adds is the distance to this row. ``None`` for unlabelled data."""
    import torch

    from pwself.data import channel_stats, take_subset
    from pwself.eval import extract_features, knn_classify
    from pwself.eval.linear import linear_probe
    from pwself.models import make_vit
    from pwself.train import resolve_device

    if cache.exists():
        return json.loads(cache.read_text())
    splits = {split: _open(cfg, split) for split in ("train", "test")}
    mean, std = cfg.data.mean, cfg.data.std
    if not mean:  # as train() computes them: over the training subset
        train_set = splits["train"]
        mean, std = channel_stats(take_subset(train_set, cfg.data.subset) if cfg.data.subset else train_set)
    torch.manual_seed(cfg.seed)  # the backbone is the first module a run builds after seeding: the same init
    device = resolve_device(cfg.device)
    backbone = make_vit(cfg.backbone, cfg.views.global_size).to(device)
    feats = {split: extract_features(backbone, ds, mean, std, size=cfg.views.global_size, progress=False,
                                     num_workers=cfg.data.num_workers, device=device) for split, ds in splits.items()}
    if (feats["train"][1] < 0).any() or (feats["test"][1] < 0).any():
        return None
    knn = knn_classify(*feats["train"], *feats["test"], ks=(10, 20))
    floor = {"knn10": knn[10]["top1"], "knn20": knn[20]["top1"]}
    if linear:
        floor["linear"] = linear_probe(*feats["train"], *feats["test"])["top1"]
    cache.write_text(json.dumps(floor))
    return floor


def _run_one(cfg: TrainConfig, progress: bool) -> dict[str, Any]:
    from pwself.eval.linear import linear_probe
    from pwself.eval.source import cached_features, open_source
    from pwself.objectives import objective_class
    from pwself.train import resolve_device, train

    run_dir = Path(cfg.out_dir)
    if not (run_dir / "knn.json").exists():
        # A half-started run without a checkpoint is moved aside and started again.
        train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=progress, overwrite=True)
    knn = json.loads((run_dir / "knn.json").read_text())["knn"]
    linear_path = run_dir / "linear.json"
    if not linear_path.exists():
        src = open_source(str(run_dir))
        device = resolve_device(cfg.device)
        src.backbone.to(device)
        data_id = {"kind": cfg.data.kind, "root": cfg.data.root, "seed": cfg.seed}
        pooling = objective_class(cfg.loss.objective).pooling
        if pooling == "bag":  # BagSSL's own aggregation: tiles of the image at native resolution
            src.size = int(_open(cfg, "train")[0][0].shape[-1])
        feats = {split: cached_features(src, _open(cfg, split), {**data_id, "split": split},
                                        pooling=pooling, cache_dir=run_dir / "features", progress=progress,
                                        device=device)
                 for split in ("train", "test")}
        res = linear_probe(*feats["train"], *feats["test"])
        linear_path.write_text(json.dumps(res, indent=2))
    linear = json.loads(linear_path.read_text())
    return {"knn10": knn["10"]["top1"], "knn20": knn["20"]["top1"] if "20" in knn else float("nan"),
            "linear": linear["top1"]}


def run_comparison(
    base: TrainConfig, objectives: list[str], seeds: list[int], out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Train and evaluate every (objective, seed); only ``loss.objective`` and ``seed`` differ between runs.

    An objective may carry overrides after a colon, e.g. ``pwml:photometric.mode=none`` or
    ``pwml:loss.matcher=feature-nn`` (several separated by ``+``); the label is the whole string.
    """
    out_dir = Path(out_dir)
    results: dict[str, Any] = {"objectives": objectives, "seeds": seeds, "runs": {}}
    for label in objectives:
        objective, _, extra = label.partition(":")
        overrides = [f"loss.objective={objective}"] + [o for o in extra.split("+") if o]
        for seed in seeds:
            name = f"{label.replace(':', '_').replace('=', '-').replace('+', '_')}_seed{seed}"
            cfg = apply_overrides(base, [*overrides, f"seed={seed}", f"out_dir={out_dir / name}", "knn_at_end=true"])
            cfg.validate()
            results["runs"].setdefault(label, {})[str(seed)] = _run_one(cfg, progress)
    results["pixel_floor"] = pixel_floor(base, out_dir / "pixel_floor.json")
    floors = {str(seed): random_init_floor(apply_overrides(base, [f"seed={seed}"]),
                                           out_dir / f"random_init_seed{seed}.json") for seed in seeds}
    if all(floors.values()):
        results["random_init"] = floors
    (out_dir / "comparison.json").write_text(json.dumps(results, indent=2))
    (out_dir / "comparison.md").write_text(comparison_table(results))
    plot_comparison(results, out_dir / "comparison.png")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: one row per objective, mean ± std over seeds of kNN k=10, k=20 and linear top-1."""
    seeds = results["seeds"]
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))}; top-1 % on the test split.", "",
             "| objective | kNN k=10 | kNN k=20 | linear |", "|---|---|---|---|"]
    for label, per_seed in results["runs"].items():
        lines.append(f"| {label} | " + _cells(per_seed) + " |")
    if results.get("random_init"):
        lines.append("| *random init (same backbone, CLS)* | " + _cells(results["random_init"]) + " |")
    floor = results.get("pixel_floor")
    if floor:
        lines.append(f"| *raw pixels (floor)* | {floor['knn10']:.2f} | {floor['knn20']:.2f} | — |")
    return "\n".join(lines) + "\n"


def _cells(per_seed: dict[str, dict[str, float]]) -> str:
    """``mean ± std`` over seeds of kNN k=10, k=20 and linear top-1, as table cells."""
    cells = []
    for key in ("knn10", "knn20", "linear"):
        m, s = _mean_std([r[key] for r in per_seed.values()])
        cells.append(f"{m:.2f} ± {s:.2f}")
    return " | ".join(cells)


def _tick_label(label: str) -> str:
    """An objective label for an axis: the objective, then one override a line, long ones broken after ``=``."""
    objective, _, extra = label.partition(":")
    lines = [objective]
    for override in filter(None, extra.split("+")):
        key, eq, value = override.partition("=")
        lines += [key + eq, value] if len(override) > 16 and eq else [override]
    return "\n".join(lines)


def plot_comparison(results: dict[str, Any], path: str | Path) -> Path:
    """Grouped bar plot (kNN k=10 and linear) with std error bars, values on the bars, and the floors
    (raw pixels, random init) as horizontal lines; the y range fits the values so that gaps of a point show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["runs"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels) + 3), 4.8))
    width = 0.38
    shown = []
    for k, (key, name) in enumerate((("knn10", "kNN k=10"), ("linear", "linear"))):
        stats = [_mean_std([r[key] for r in results["runs"][lab].values()]) for lab in labels]
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        bars = ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m, _ in stats], padding=2, fontsize=7)
        shown += [m for m, _ in stats]
    floor = results.get("pixel_floor")
    if floor:
        ax.axhline(floor["knn10"], color="gray", linestyle="--", linewidth=1, label="raw pixels kNN k=10")
        shown.append(floor["knn10"])
    if results.get("random_init"):
        m, _ = _mean_std([r["knn10"] for r in results["random_init"].values()])
        ax.axhline(m, color="black", linestyle=":", linewidth=1, label="random init kNN k=10")
        shown.append(m)
    if shown:
        ax.set_ylim(max(0.0, 5 * (min(shown) // 5) - 5), min(100.0, max(shown) + 4))
    ax.set_xticks(range(len(labels)), [_tick_label(lab) for lab in labels], fontsize=8)
    ax.set_ylabel("top-1 % (test)")
    ax.set_title(f"objectives, same budget, {len(results['seeds'])} seed(s) each: mean ± std")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
