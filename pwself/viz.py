"""Run report: training curves (PNG), the kNN table, and a static HTML page; never imported by training."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["read_metrics", "plot_training_curves", "write_report"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss terms, matched patches, schedules and teacher entropy against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, style in (("loss", "-"), ("cls", "--"), ("patch", ":")):
        if rows and key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], style, label=key)
    ax.set_title("loss (total, CLS and patch cross-entropy)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[0, 1]
    if rows and "n_match" in rows[0]:
        ax.plot(steps, [r["n_match"] for r in rows], color="tab:green")
    ax.set_title("matched patch pairs per view pair and image")
    ax.set_xlabel("step")
    ax = axes[1, 0]
    if rows:
        ax.plot(steps, [r["lr"] for r in rows], label="lr")
        ax.set_ylabel("lr")
        ax2 = ax.twinx()
        ax2.plot(steps, [r["momentum"] for r in rows], color="tab:red", label="teacher momentum")
        ax2.plot(steps, [r["teacher_temp"] * 10 for r in rows], color="tab:purple", label="teacher temp x10")
        ax2.legend(loc="lower right")
    ax.set_title("schedules")
    ax.set_xlabel("step")
    ax = axes[1, 1]
    if rows and "teacher_entropy" in rows[0]:
        ax.plot(steps, [r["teacher_entropy"] for r in rows], label="per-image entropy")
        ax.plot(steps, [r["teacher_mean_entropy"] for r in rows], label="entropy of batch mean")
        ax.legend()
    ax.set_title("teacher CLS distribution (nats; collapse: both equal)")
    ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def knn_markdown(knn: dict[Any, dict[str, float]], label: str = "model") -> str:
    """kNN results as a Markdown table (one row per k)."""
    lines = [f"| {label} | k | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
    for k, v in sorted(knn.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {label} | {k} | {v['top1']:.2f} | {v['top5']:.2f} |")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``training_curves.png``, ``report.md`` and a self-contained ``report.html`` for a run.

    Returns:
        Path of ``report.html``.
    """
    import yaml

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    objective = cfg.get("loss", {}).get("objective", "?")
    png = plot_training_curves(rows, run_dir / "training_curves.png", title=f"{run_dir.name} ({objective})")
    knn_path = run_dir / "knn.json"
    knn = json.loads(knn_path.read_text())["knn"] if knn_path.exists() else None
    history = read_metrics(run_dir / "knn_history.jsonl")

    md = [f"# pwself run `{run_dir}`", ""]
    md.append(f"objective **{objective}**, {rows[-1]['step'] if rows else 0} steps, "
              f"final loss {rows[-1]['loss']:.4f}" if rows else "no metrics logged")
    md.append("")
    if knn:
        md += ["## kNN on frozen teacher CLS features (weighted, T = 0.07)", "", knn_markdown(knn, objective), ""]
    if history:
        md += ["## kNN during training", "", "| epoch | k=10 top-1 |", "|---|---|"]
        md += [f"| {h['epoch']} | {h['knn'].get('10', h['knn'].get(10, {})).get('top1', float('nan')):.2f} |"
               for h in history]
        md.append("")
    md += ["![training curves](training_curves.png)", ""]
    (run_dir / "report.md").write_text("\n".join(md))

    img = base64.b64encode(png.read_bytes()).decode()
    table = ""
    if knn:
        cells = "".join(
            f"<tr><td>{k}</td><td>{v['top1']:.2f}</td><td>{v['top5']:.2f}</td></tr>"
            for k, v in sorted(knn.items(), key=lambda kv: int(kv[0]))
        )
        table = f"<h2>kNN (frozen teacher CLS, T = 0.07)</h2><table><tr><th>k</th><th>top-1 %</th><th>top-5 %</th></tr>{cells}</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pwself report {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>pwself run {html.escape(str(run_dir))}</h1><p>{html.escape(md[2])}</p>{table}
<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Config</h2><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre></body></html>"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
