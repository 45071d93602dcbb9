"""Figures: training and learning curves, patch matches, attention maps, image grids; never imported by training
(the run report that shows them is :mod:`pwself.report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pwself.run.folder import RunFolder, write_atomic

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

__all__ = ["read_metrics", "plot_training_curves", "learning_curve", "plot_learning_curves", "draw_matches",
           "draw_attention", "cls_attention", "patch_pca_rgb", "match_figures", "attention_figures", "save_grid",
           "run_view_sizes", "curve_hint"]


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


def save_grid(pngs: list[Path], path: Path) -> None:
    """Several PNGs side by side in one figure (the viz commands' overview)."""
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


def run_view_sizes(spec: str) -> dict[str, Any]:
    """The sizes a run cut its views with (a run folder's config, or a checkpoint's)."""
    from pwself.run.checkpoint import config_of_checkpoint, load_checkpoint
    from pwself.run.folder import RunFolder
    from pwself.run.state import read_run_config

    path = Path(spec)
    if path.is_dir() and RunFolder(path).config.is_file():
        cfg = read_run_config(path)
    elif path.exists():
        cfg = config_of_checkpoint(load_checkpoint(path))
    else:
        raise FileNotFoundError(f"--run {spec} does not exist: pass a run folder or a checkpoint file")
    return {"global_size": cfg.views.global_size, "local_size": cfg.views.local_size,
            "patch_size": cfg.backbone.patch_size, "photometric": cfg.photometric.mode,
            "channels": cfg.backbone.in_chans or 3}


def curve_hint(run_dir: Path, metric: str) -> str:
    """What gives a run a learning curve of ``metric``: kNN needs labelled held-out images first."""
    if metric == "miou":
        return "train with eval.dense_every_epochs=0.5 eval.dense_data=DIR"
    from pwself.run.folder import RunFolder

    if RunFolder(run_dir).config.is_file():
        from pwself.data import scorable
        from pwself.run.state import read_run_config

        if not scorable(read_run_config(run_dir).data):
            return ("its images have no labelled val/ or test/ split, so kNN cannot score it: use --metric miou "
                    "(a run with eval.dense_data), or train on train/CLASS/ and val/CLASS/ folders")
    return "train with eval.knn_every_epochs=0.5 (and knn_at_end)"


def match_figures(images: list[str], out: Path, sizes: dict[str, Any], seed: int, size: int, channels: int
                  ) -> tuple[Path, list[str]]:
    """``pwself viz-matches``: two views of each image and their matched patches (``OUT/STEM_matches.png``) and
    all of them side by side (``OUT/matches_grid.png``). ``sizes``: ``global_size``, ``local_size``,
    ``patch_size``, ``photometric``. Returns the grid and the images whose two crops do not overlap."""
    import matplotlib.pyplot as plt

    from pwself.data.datasets import read_images

    for name in ("global_size", "local_size"):
        if sizes[name] % sizes["patch_size"]:
            raise ValueError(f"--{name.replace('_', '-')} {sizes[name]} is not a multiple of --patch-size "
                             f"{sizes['patch_size']}")
    out.mkdir(parents=True, exist_ok=True)
    pngs, disjoint = [], []
    for path, img in zip(images, read_images(images, size, channels)):
        png = out / f"{Path(path).stem}_matches.png"
        fig = draw_matches(img, sizes["patch_size"], sizes["global_size"], sizes["local_size"], seed,
                           sizes["photometric"], png, title=Path(path).name)
        if fig.matched_pairs == 0:
            disjoint.append(Path(path).name)
        plt.close(fig)
        pngs.append(png)
    grid = out / "matches_grid.png"  # each viz command's files have their own names
    save_grid(pngs, grid)
    return grid, disjoint


def attention_figures(images: list[str], checkpoint: str, out: Path) -> Path:
    """``pwself viz-attention``: the teacher's last-layer CLS attention per head and a patch-feature PCA map of
    each image at the run's input size (``OUT/STEM_attention.png``) and all of them side by side."""
    import matplotlib.pyplot as plt

    from pwself.data.datasets import read_images
    from pwself.export import teacher_backbone
    from pwself.run.checkpoint import config_of_checkpoint, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = config_of_checkpoint(ckpt)
    backbone = teacher_backbone(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    size = cfg.views.global_size
    for path, img in zip(images, read_images(images, size, cfg.backbone.in_chans)):
        png = out / f"{Path(path).stem}_attention.png"
        plt.close(draw_attention(backbone, img, cfg.data.mean, cfg.data.std, size, png, title=Path(path).name))
        pngs.append(png)
    grid = out / "attention_grid.png"
    save_grid(pngs, grid)
    return grid
