"""The run report (``report.md``, a self-contained ``report.html``): how the run was made, its kNN against its
floors, the dense curve, the scores protocols measured after training, the training curves and figures; never
imported by training."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pwself.run.folder import RunFolder, write_atomic
from pwself.viz import draw_attention, draw_matches, plot_training_curves, read_metrics

if TYPE_CHECKING:
    import torch

__all__ = ["write_report", "knn_markdown"]


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

    from pwself.config import ConfigError, read_yaml, rename_keys

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    rows = read_metrics(run.metrics)
    cfg = read_yaml(run.config, "run config") if run.config.exists() else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"run config {run.config} is not a mapping of keys: restore the run's file")
    cfg = rename_keys(cfg, quiet=True)  # a run of an older pwself: its keys where they are now
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
