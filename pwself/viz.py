"""Run report: training curves (PNG), the kNN table, and a static HTML page; never imported by training."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pwself.run.folder import RunFolder, write_atomic

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

__all__ = ["read_metrics", "plot_training_curves", "write_report", "draw_matches", "draw_attention", "cls_attention",
           "patch_pca_rgb"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (``null``, a non-finite number, read as NaN; a torn last line, left by
    a kill during a write, is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        rows.append({k: float("nan") if v is None else v for k, v in row.items()})
    return rows


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss terms, matched patches, schedules and teacher entropy against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    mark = {"marker": "o", "markersize": 4} if len(rows) <= 20 else {}  # a line through a few points hides them
    if not rows:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    ax = axes[0, 0]
    for key, style in (("loss", "-"), ("cls", "--"), ("patch", ":")):
        if rows and key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], style, label=key, **mark)
    ax.set_title("loss (total, CLS and patch cross-entropy)")
    ax.set_xlabel("step")
    if rows:
        ax.legend()
    ax = axes[0, 1]
    if rows and "n_match" in rows[0]:
        ax.plot(steps, [r["n_match"] for r in rows], color="tab:green", **mark)
    ax.set_title("matched patch pairs per view pair and image")
    ax.set_xlabel("step")
    ax = axes[1, 0]
    if rows:
        ax.plot(steps, [r["lr"] for r in rows], label="lr", **mark)
        ax.set_ylabel("lr")
        ax2 = ax.twinx()
        ax2.plot(steps, [r["momentum"] for r in rows], color="tab:red", label="teacher momentum", **mark)
        ax2.plot(steps, [r["teacher_temp"] * 10 for r in rows], color="tab:purple", label="teacher temp x10",
                 **mark)
        ax2.legend(loc="lower right")
    ax.set_title("schedules")
    ax.set_xlabel("step")
    ax = axes[1, 1]
    if rows and "teacher_entropy" in rows[0]:
        ax.plot(steps, [r["teacher_entropy"] for r in rows], label="per-image entropy", **mark)
        ax.plot(steps, [r["teacher_mean_entropy"] for r in rows], label="entropy of batch mean", **mark)
        ax.legend(loc="upper left")
    if rows and "rank_cls" in rows[0]:  # features of one point: effective rank near 1 (pwself.diagnostics)
        ax2 = ax.twinx()
        ax2.plot(steps, [r["rank_cls"] for r in rows], color="tab:gray", ls="--", label="eff. rank CLS", **mark)
        if "rank_patch" in rows[0]:
            ax2.plot(steps, [r["rank_patch"] for r in rows], color="tab:brown", ls="--", label="eff. rank patches",
                     **mark)
        ax2.set_ylabel("effective rank")
        ax2.legend(loc="lower right")
    ax.set_title("collapse: teacher entropy (nats) and feature rank")
    ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def learning_curve(run_dir: str | Path, metric: str = "knn") -> list[dict[str, float]]:
    """kNN (k = 10) or, with ``metric="miou"``, dense mIoU of a run against its training time.

    kNN: the in-training evaluations (``knn_history.jsonl``, written with ``eval.knn_every_epochs``) and the final
    one (``knn.json``); mIoU: ``dense_history.jsonl`` (``eval.dense_every_epochs``). Each point has ``step``,
    ``train_s`` (wall seconds training, evaluations excluded), ``cpu_s`` (CPU seconds of the process) and
    ``top1`` (the metric's value); rows from runs older than the time logging have no point, and a step
    evaluated twice (a resumed run) keeps its last row."""
    run = RunFolder(run_dir)
    if metric == "miou":
        rows = {r["step"]: r for r in read_metrics(run.dense_history)}
        return [{"step": r["step"], "train_s": r["train_s"], "cpu_s": r["cpu_s"], "top1": r["miou"]}
                for _, r in sorted(rows.items())]
    rows = read_metrics(run.knn_history)
    if run.knn.exists():
        rows.append(run.read_json(RunFolder.KNN))
    return [{"step": r["step"], "train_s": r["train_s"], "cpu_s": r.get("cpu_s", r["train_s"]),
             "top1": r["knn"]["10"]["top1"]} for r in rows if "train_s" in r and "10" in r["knn"]]


def plot_learning_curves(runs: dict[str, list[dict[str, float]]], path: str | Path,
                         floors: dict[str, float] | None = None, clock: str = "cpu_s",
                         ylabel: str = "kNN top-1 % (k = 10, held-out)") -> Path:
    """kNN k=10 (or the metric ``ylabel`` names) against training minutes (``clock``: ``cpu_s`` or ``train_s``)
    of several runs, with the floors (``{label: value}``) as horizontal lines; each run's last point is
    labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, points in runs.items():
        xs, ys = [p[clock] / 60 for p in points], [p["top1"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if points:
            ax.annotate(f"{ys[-1]:.2f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color=line.get_color())
    for (label, value), style in zip((floors or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{label} ({value:.2f})")
    ax.set_xlabel("training CPU-minutes (process CPU time, evaluation excluded)" if clock == "cpu_s"
                  else "training minutes (wall clock, evaluation excluded)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def knn_markdown(knn: dict[Any, dict[str, float]], label: str = "model",
                 floors: dict[str, dict[str, float] | None] | None = None) -> str:
    """kNN results as a Markdown table (one row per k), with the random-init and raw-pixel floors of the same
    protocol below them when given (top-5 is not measured for the floors)."""
    lines = [f"| {label} | k | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
    for k, v in sorted(knn.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {label} | {k} | {v['top1']:.2f} | {v['top5']:.2f} |")
    names = {"start": "*starting model (backbone.init)*", "random_init": "*random init, same backbone*",
             "pixels": "*raw pixels*"}
    for key, name in names.items():
        floor = (floors or {}).get(key)
        for k in sorted(int(str(k)) for k in knn) if floor else ():
            if f"knn{k}" in floor:
                lines.append(f"| {name} | {k} | {floor[f'knn{k}']:.2f} | — |")
    return "\n".join(lines)


def _training_image(dataset: Any, index: int, channels: int, show: int = 512) -> tuple[torch.Tensor | None, str]:
    """A folder's image ``index`` as training crops it: the photo itself (not the evaluation's resized centre
    crop), shrunk to ``show`` px for the figure, and its label; ``(None, "")`` for other datasets."""
    files = getattr(getattr(dataset, "dataset", dataset), "files", None)
    if files is None:
        return None, ""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(files[index]) as im:
        size = im.size
        im = im.convert("L" if channels == 1 else "RGB")
        im.thumbnail((show, show))
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    shown = f", shown at {arr.shape[-1]}x{arr.shape[-2]}" if max(size) > show else ""
    return arr, f"training photo {files[index].name} ({size[0]}x{size[1]} px{shown})"


def _run_figures(run_dir: Path, cfg: dict[str, Any], n_images: int = 3) -> tuple[list[tuple[str, Path]], str]:
    """Match and attention figures on a few images of the run's data; a note instead if that fails."""
    import matplotlib.pyplot as plt

    try:
        from pwself.config import config_from_dict
        from pwself.data import open_dataset
        from pwself.export import load

        tc = config_from_dict(cfg)
        dataset = open_dataset(tc.data, "train", tc.backbone.in_chans, tc.backbone.patch_size, tc.seed)
        images = [dataset[i][0].float() / 255 for i in range(min(n_images, len(dataset)))]
        p, v = tc.backbone.patch_size, tc.views
        figs = []
        for k, img in enumerate(images):
            out = RunFolder(run_dir).figure("matches", k)
            photo, source = _training_image(dataset, k, tc.backbone.in_chans)
            plt.close(draw_matches(img if photo is None else photo, p, v.global_size, v.local_size, seed=k,
                                   photometric=tc.photometric.mode, path=out, source=source or
                                   f"training image ({img.shape[-2]}x{img.shape[-1]} px)"))
            figs.append((f"patch matches, image {k} (global vs local view)", out))
        backbone = load(run_dir)
        for k, img in enumerate(images):
            out = RunFolder(run_dir).figure("attention", k)
            plt.close(draw_attention(backbone, img, tc.data.mean, tc.data.std, v.global_size, out))
            figs.append((f"teacher CLS attention and patch PCA, image {k}", out))
        return figs, ""
    except Exception as e:  # noqa: BLE001 - the report must not fail because a figure did
        return [], f"(figures skipped: {type(e).__name__}: {e})"


def _score_lines(run: RunFolder) -> list[str]:
    """What the protocols measured on the finished run (``compare``'s linear probe, dense probe and any
    ``--protocols``), each drawn as its protocol draws its table."""
    from pwself.eval.protocols import PROTOCOLS

    lines = []
    for name, res in run.scores().items():
        if name in PROTOCOLS and isinstance(res, dict):
            res = {k: v for k, v in res.items() if k != "data_key"}
            lines += [f"## {PROTOCOLS[name].help}", "", *PROTOCOLS[name].table({run.path.name: res}, ""), ""]
    return lines


def _data_of(cfg: dict[str, Any]) -> str:
    """`` (data.kind KIND, ROOT's name)``: where the training images came from."""
    data = cfg.get("data") or {}
    if not data.get("kind"):
        return ""
    root = Path(str(data.get("root") or "")).name
    return f" (data.kind {data['kind']}{', ' + root if root else ''})"


def _about_run(run_dir: Path, cfg: dict[str, Any], has_knn: bool) -> str:
    """One line on how the run was made (version, date, device, images, time) and why kNN is missing if it is."""
    finished = RunFolder(run_dir).read_json(RunFolder.FINISHED) or {}
    if "version" in finished:
        procs = f", {finished['world_size']} processes" if finished.get("world_size", 1) > 1 else ""
        parts = [f"pwself {finished['version']}", f"finished {finished['finished_at']}",
                 f"device {finished['device']}{procs}", f"{finished['images']} training images{_data_of(cfg)}",
                 f"{finished['train_s'] / 60:.1f} min training ({finished['cpu_s'] / 60:.1f} CPU-min)"]
    else:
        parts = ["not finished (or finished by an older pwself): no version, date or timing recorded"]
    if cfg:  # the lr the global batch gave (what a user compares between runs of other batch sizes)
        from pwself.config import ConfigError, config_from_dict
        from pwself.schedules import batch_line

        try:
            parts.append(batch_line(config_from_dict(cfg), finished.get("world_size", 1)))
        except (ConfigError, TypeError, ValueError):  # a config of another pwself version: the rest still reports
            pass
    if not has_knn:
        why = ("eval.knn_at_end=false" if (cfg.get("eval") or {}).get("knn_at_end") is False
               else "the data has no labelled held-out split (e.g. an unlabelled folder)")
        parts.append(f"kNN skipped: {why}")
    return "; ".join(parts)


def _dense_lines(dense: list[dict], start: dict, objective: str, cfg: dict[str, Any]) -> list[str]:
    """The report's dense table: the run's last dense point (linear probe, and Hummingbird for runs since
    issue 43) beside what the starting model scored (``backbone.init``); nothing without dense points."""
    if not dense:
        return []
    hb = "hbird_miou" in dense[-1]
    lines = [f"## Dense probe on {(cfg.get('eval') or {}).get('dense_data', '?')} (mIoU %)", "",
             "| model | step | linear probe | Hummingbird |" if hb else "| model | step | mIoU |",
             "|---|---|---|---|" if hb else "|---|---|---|",
             f"| {objective} | {dense[-1]['step']} | {dense[-1]['miou']:.2f} |"
             + (f" {dense[-1]['hbird_miou']:.2f} |" if hb else "")]
    if "miou" in start:
        lines.append(f"| *starting model (backbone.init)* | 0 | {start['miou']:.2f} |"
                     + (f" {start['hbird_miou']:.2f} |" if hb and "hbird_miou" in start else (" — |" if hb else "")))
    return [*lines, ""]


def write_report(run_dir: str | Path) -> Path:
    """Write ``training_curves.png``, ``report.md`` and a self-contained ``report.html`` for a run.

    Returns:
        Path of ``report.html``.
    """
    import yaml

    from pwself.config import ConfigError, read_yaml

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    rows = read_metrics(run.metrics)
    cfg = read_yaml(run.config, "run config") if run.config.exists() else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"run config {run.config} is not a mapping of keys: restore the run's file")
    objective = cfg.get("recipe") or cfg.get("loss", {}).get("objective", "?")
    png = plot_training_curves(rows, run.curves, title=f"{run_dir.name} ({objective})")
    knn = (run.read_json(RunFolder.KNN) or {}).get("knn")
    floors = run.read_json(RunFolder.FLOORS)
    history = read_metrics(run.knn_history)

    md = [f"# pwself run `{run_dir}`", ""]
    summary = (f"objective {objective}, {rows[-1]['step']} steps, final loss {rows[-1]['loss']:.4f}"
               if rows else "no metrics logged")
    about = _about_run(run_dir, cfg, knn is not None)
    md += [summary, "", about, ""]
    if knn:
        md += ["## kNN on frozen teacher features (weighted, T = 0.07)", "", knn_markdown(knn, objective, floors),
               ""]
    md += _dense_lines(read_metrics(run.dense_history), (floors or {}).get("start") or {}, objective,
                       cfg)
    history_rows = [(h["epoch"], h["knn"].get("10", {}).get("top1", float("nan"))) for h in history]
    if knn:
        history_rows.append((rows[-1]["epoch"] if rows else "end", knn.get("10", {}).get("top1", float("nan"))))
    if len(history_rows) > 1:
        md += ["## kNN (k = 10, top-1 %) per evaluated epoch", "", "| epoch | top-1 |", "|---|---|"]
        md += [f"| {e:g} | {a:.2f} |" if isinstance(e, (int, float)) else f"| {e} | {a:.2f} |" for e, a in history_rows]
        md.append("")
    scores = _score_lines(run)
    md += scores + [f"![training curves]({RunFolder.CURVES})", ""]
    figures, figure_note = _run_figures(run_dir, cfg)
    md += [f"![{name}]({png.name})" for name, png in figures] + ([figure_note] if figure_note else [])
    write_atomic(run.report_md, "\n".join(md))

    img = base64.b64encode(png.read_bytes()).decode()
    figure_html = "".join(
        f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' style='max-width:100%' "
        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        for name, p in figures
    ) + (f"<p>{html.escape(figure_note)}</p>" if figure_note else "")
    table = ""
    if knn:
        cells = "".join(
            f"<tr><td>{k}</td><td>{v['top1']:.2f}</td><td>{v['top5']:.2f}</td></tr>"
            for k, v in sorted(knn.items(), key=lambda kv: int(kv[0]))
        )
        head = "<tr><th>k</th><th>top-1 %</th><th>top-5 %</th></tr>"
        table = f"<h2>kNN (frozen teacher CLS, T = 0.07)</h2><table>{head}{cells}</table>"
    if len(history_rows) > 1:
        cells = "".join(f"<tr><td>{e if isinstance(e, str) else f'{e:g}'}</td><td>{a:.2f}</td></tr>"
                        for e, a in history_rows)
        head = "<tr><th>epoch</th><th>top-1 %</th></tr>"
        table += f"<h2>kNN (k = 10) per evaluated epoch</h2><table>{head}{cells}</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pwself report {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>pwself run {html.escape(str(run_dir))}</h1><p>{html.escape(summary)}</p><p>{html.escape(about)}</p>{table}
{f"<h2>Scores after training</h2><pre>{html.escape(chr(10).join(scores))}</pre>" if scores else ""}
<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{img}" style="max-width:100%">
{figure_html}<h2>Config</h2><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre></body></html>"""
    out = run.report_html
    write_atomic(out, page)
    return out


def _as_display(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` float in [0, 1] -> HxW or HxWx3 numpy for imshow."""
    x = img.detach().cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def draw_matches(
    image: torch.Tensor,
    patch_size: int,
    global_size: int,
    local_size: int,
    seed: int = 0,
    photometric: str = "patch",
    path: str | Path | None = None,
    title: str = "",
    source: str = "image",
) -> Figure:
    """Figure 2 of the paper for one image: a global and a local view, their patch grids, matched pairs.

    Row 1: original image with both crop boxes; row 2: the two views after crop/flip with grid lines
    and lines joining matched patch centres (one colour per pair); row 3: the same views after
    photometric augmentation (``photometric`` mode).

    Args:
        image: ``[C, H, W]`` float image in ``[0, 1]``.
        patch_size: Patch side ``p``.
        global_size: Global view side (multiple of ``p``).
        local_size: Local view side (multiple of ``p``).
        seed: Seed of the crops and augmentation.
        photometric: ``patch``, ``image`` or ``none``.
        path: Where to save the PNG (optional).
        title: Figure title.
        source: What ``image`` is, for its panel's title (e.g. the training photo and its size).

    Returns:
        The figure; its ``matched_pairs`` attribute is the number of matched patch pairs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Rectangle

    from pwself.augment import PhotometricAugment, PhotometricConfig
    from pwself.matching import match_pair
    from pwself.views import MultiCrop

    gen = torch.Generator().manual_seed(seed)
    views = MultiCrop(1, 1, global_size, local_size)(image[None].float(), gen)
    aug = PhotometricAugment(PhotometricConfig(mode=photometric), patch_size)
    crops = [views.global_crops[0], views.local_crops[0]]
    augmented = [aug(c[None], gen)[0] for c in crops]
    sizes = [global_size, local_size]
    grids = [(s // patch_size, s // patch_size) for s in sizes]
    boxes = [views.boxes[v, 0].tolist() for v in range(2)]
    flips = [bool(views.flips[v, 0]) for v in range(2)]
    pairs = match_pair(boxes[0], flips[0], grids[0], boxes[1], flips[1], grids[1])

    fig = plt.figure(figsize=(9, 9))
    gs = fig.add_gridspec(3, 2)
    ax0 = fig.add_subplot(gs[0, :])
    ax0.imshow(_as_display(image), cmap="gray", vmin=0, vmax=1)
    for box, color, name in zip(boxes, ("gold", "deepskyblue"), ("global", "local")):
        x0, y0, x1, y1 = box
        ax0.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=2, label=name))
    ax0.legend(loc="upper right", fontsize=8)
    ax0.set_title(f"{source}, crop boxes; {len(pairs)} matched patch pairs"
                  + ("" if pairs else " (the two crops do not overlap: draw another seed)"))
    ax0.axis("off")
    for row, imgs, label in ((1, crops, "after crop/flip"), (2, augmented, f"after {photometric} photometric aug")):
        axes = [fig.add_subplot(gs[row, c]) for c in range(2)]
        _draw_view_pair(fig, axes, imgs, grids, flips, pairs, patch_size, label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=100)
    fig.matched_pairs = len(pairs)
    return fig


def _draw_view_pair(fig: Figure, axes: list, imgs: list, grids: list, flips: list, pairs: list, patch_size: int,
                    label: str) -> None:
    """Two views with their patch grids and a line joining the centres of every matched pair."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import ConnectionPatch

    cmap = plt.get_cmap("hsv")
    for ax, img, grid, flip, name in zip(axes, imgs, grids, flips, ("global", "local")):
        ax.imshow(_as_display(img), cmap="gray", vmin=0, vmax=1)
        for k in range(1, grid[0]):
            ax.axhline(k * patch_size - 0.5, color="white", lw=0.4, alpha=0.6)
            ax.axvline(k * patch_size - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.set_title(f"{name} view {label}{' (flipped)' if flip else ''}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for n, (ta, tb) in enumerate(pairs):
        (ra, ca), (rb, cb) = divmod(ta, grids[0][1]), divmod(tb, grids[1][1])
        pa = ((ca + 0.5) * patch_size - 0.5, (ra + 0.5) * patch_size - 0.5)
        pb = ((cb + 0.5) * patch_size - 0.5, (rb + 0.5) * patch_size - 0.5)
        color = cmap(n / max(len(pairs), 1))
        fig.add_artist(ConnectionPatch(pa, pb, "data", "data", axesA=axes[0], axesB=axes[1], color=color, lw=0.8))
        axes[0].plot(*pa, "o", ms=2.5, color=color)
        axes[1].plot(*pb, "o", ms=2.5, color=color)


def cls_attention(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-block CLS-to-patch attention of a timm ViT (any family: registers, RoPE): ``[B, heads, rows, cols]``.
    The block's own softmax is read where timm's unfused path passes it to ``attn_drop``, so position handling
    (RoPE included) is the model's."""
    import torch

    attn = backbone.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.__setitem__("a", i[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            backbone.forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = fused
    a = captured["a"]  # [B, heads, N, N]
    b = a.shape[0]
    p = backbone.patch_embed.patch_size[0]
    rows, cols = x.shape[-2] // p, x.shape[-1] // p
    return a[:, :, 0, backbone.num_prefix_tokens :].reshape(b, a.shape[1], rows, cols)


def patch_pca_rgb(tokens: torch.Tensor) -> torch.Tensor:
    """First 3 principal components of ``[T, D]`` patch tokens, min-max scaled to ``[0, 1]``: ``[T, 3]``."""
    import torch

    x = tokens.float() - tokens.float().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comp = x @ v[:3].T
    if comp.shape[1] < 3:
        comp = torch.cat([comp, comp.new_zeros(comp.shape[0], 3 - comp.shape[1])], 1)
    lo, hi = comp.min(0).values, comp.max(0).values
    return (comp - lo) / (hi - lo).clamp(min=1e-8)


def draw_attention(
    backbone: torch.nn.Module,
    image: torch.Tensor,
    mean: list[float],
    std: list[float],
    size: int,
    path: str | Path | None = None,
    title: str = "",
) -> Figure:
    """Per-head last-layer CLS attention maps over the image and a PCA-of-patch-features RGB map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    from pwself.models import forward_tokens

    x = image[None].float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    xn = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    backbone.eval()
    att = cls_attention(backbone, xn)[0]
    with torch.inference_mode():
        tok = forward_tokens(backbone, xn)
    rows, cols = tok.grid
    pca = patch_pca_rgb(tok.patches[0]).reshape(rows, cols, 3)
    heads = att.shape[0]
    fig, axes = plt.subplots(1, heads + 2, figsize=(2.2 * (heads + 2), 2.6))
    axes[0].imshow(_as_display(x[0]), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image", fontsize=8)
    for hd in range(heads):
        axes[hd + 1].imshow(att[hd].numpy(), cmap="inferno", extent=(0, size, size, 0))
        axes[hd + 1].set_title(f"head {hd}", fontsize=8)
    axes[-1].imshow(pca.numpy(), extent=(0, size, size, 0))
    axes[-1].set_title("patch PCA", fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=100)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int) -> None:
    """Save a figure through a temporary file: a full disk leaves no empty or torn PNG, and names the file."""
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
