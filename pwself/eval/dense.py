"""Dense probe: a linear classifier on each frozen patch token, scored as semantic segmentation.

The protocol of dinov2's linear segmentation head (mmsegmentation's ``BNHead`` with ``resize_concat`` off):
patch tokens of the last block after the final norm, one linear layer per token, its logits upsampled
bilinearly to the mask and trained with per-pixel cross-entropy (255 ignored). Tokens are cached, so there
is no augmentation; they are standardized with the statistics of the train part (as the linear probe
does), which stands in for the head's BatchNorm. A grid of learning rates is trained in one pass and the
head with the best mean IoU on a held-out tenth of train is the one scored on test, at each mask's full
resolution. Scores follow mmsegmentation: IoU per class over the whole test set, the mean over classes
present in the ground truth or the predictions (a class in neither is excluded), and pixel accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pwself.data import fingerprint
from pwself.data.datasets import DatasetError
from pwself.data.dense import IGNORE_INDEX, DenseSplit, dense_classes, open_dense
from pwself.eval.features import normalize_images
from pwself.eval.metrics import confusion_matrix, segmentation_scores
from pwself.eval.registry import Protocol
from pwself.eval.source import load_or_compute
from pwself.models import forward_tokens

log = logging.getLogger(__name__)

__all__ = ["DenseFeatures", "backbone_encoder", "pixel_encoder", "dense_features", "confusion_matrix",
           "segmentation_scores", "dense_probe", "dense_markdown", "DenseSettings", "evaluate_dense",
           "probe_encoder"]

Encoder = Callable[[Tensor], Tensor]  # normalized images [B, C, S, S] -> tokens [B, h, w, D]


@dataclass
class DenseFeatures:
    """Frozen tokens of a split and its masks.

    Attributes:
        tokens: ``[N, h, w, D]`` float32 patch tokens.
        masks: ``N`` long masks at their full resolution (class index, 255 = ignore).
    """

    tokens: Tensor
    masks: list[Tensor]


def backbone_encoder(backbone: nn.Module) -> Encoder:
    """Patch tokens of a timm ViT's last block after the final norm, on their grid."""
    def encode(x: Tensor) -> Tensor:
        tok = forward_tokens(backbone, x)
        return tok.patches.reshape(len(x), *tok.grid, -1)
    return encode


def pixel_encoder(patch_size: int) -> Encoder:
    """Each patch's raw pixels as its token: the floor a learned patch token must beat."""
    def encode(x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, kernel_size=patch_size, stride=patch_size)  # [B, C*p*p, L], row-major patches
        return cols.transpose(1, 2).reshape(b, h // patch_size, w // patch_size, -1)
    return encode


@torch.inference_mode()
def dense_features(encode: Encoder, split: DenseSplit, mean: list[float], std: list[float], batch_size: int = 128,
                   device: str | torch.device = "cpu", progress: bool = True, desc: str = "dense features",
                   ) -> DenseFeatures:
    """Encode every image of ``split``; masks are kept as read."""
    tokens, masks = [], []
    for start in tqdm(range(0, len(split), batch_size), desc=desc, disable=not progress, leave=False):
        items = [split[i] for i in range(start, min(start + batch_size, len(split)))]
        images = torch.stack([im for im, _ in items]).to(device)
        tokens.append(encode(normalize_images(images, mean, std)).float().cpu())
        masks += [m for _, m in items]
    return DenseFeatures(torch.cat(tokens), masks)


def cache_key(parts: dict) -> str:
    """A short stable hash of what identifies cached features."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _targets(masks: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Masks at the logits' upsampled size (nearest, so no class is invented) as one ``[N, H, W]`` tensor."""
    out = [m if tuple(m.shape) == size else
           F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long() for m in masks]
    return torch.stack(out)


def _logits(x: Tensor, weight: Tensor, bias: Tensor, size: tuple[int, int]) -> Tensor:
    """``[K, B, C, H, W]``: every head's logits on tokens ``[B, h, w, D]``, upsampled bilinearly to ``size``."""
    logits = torch.einsum("bhwd,kdc->kbchw", x, weight) + bias[:, None, :, None, None]
    k, b = logits.shape[:2]
    up = F.interpolate(logits.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
    return up.view(k, b, *up.shape[1:])


def _train_heads(x: Tensor, y: Tensor, lrs: Sequence[float], n_classes: int, epochs: int, batch_size: int,
                 seed: int) -> tuple[Tensor, Tensor]:
    """One linear head per learning rate, trained together on the same batches: SGD with momentum 0.9, a
    per-iteration cosine, per-pixel cross-entropy averaged over the labelled pixels. Heads start at zero and
    the batch order depends on ``seed`` only, so a head is the same whichever other heads train beside it."""
    k, d = len(lrs), x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.zeros(k, d, n_classes))
    bias = nn.Parameter(torch.zeros(k, n_classes))
    # Heads share no parameters, so the sum of their losses trains each on its own; a head's learning rate
    # is a scale on its gradient under one SGD (the same update as its own lr: momentum, no weight decay).
    opt = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9)
    scale = torch.tensor([lr * batch_size / 256 for lr in lrs])
    total = epochs * max(1, math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    size = tuple(y.shape[-2:])
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(batch_size):
            logits = _logits(x[idx], weight, bias, size)
            target = y[idx].expand(k, *y[idx].shape)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(k, -1)
            n_valid = (y[idx] != IGNORE_INDEX).sum().clamp(min=1)
            opt.zero_grad()
            (ce.sum(1) / n_valid).sum().backward()
            with torch.no_grad():  # each head's own learning rate, as a gradient scale under one SGD
                weight.grad.mul_(scale[:, None, None])
                bias.grad.mul_(scale[:, None])
            opt.step()
            sched.step()
    return weight.detach(), bias.detach()


@torch.no_grad()
def _test_confusion(x: Tensor, masks: list[Tensor], weight: Tensor, bias: Tensor, n_classes: int) -> Tensor:
    """Confusion matrix of one head on test, each image's logits upsampled to its own mask's size."""
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(masks):
        by_size.setdefault(tuple(m.shape), []).append(i)
    for size, idx in by_size.items():
        for chunk in torch.tensor(idx).split(256):
            pred = _logits(x[chunk], weight[None], bias[None], size)[0].argmax(1)
            conf += confusion_matrix(pred, torch.stack([masks[i] for i in chunk.tolist()]), n_classes)
    return conf


LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
"""The dense probe's starting learning-rate grid (per 256 images; scaled by the batch)."""


def _next_lr(lr: float, up: bool) -> float:
    """The grid's next value beyond ``lr``: steps of 3 and 10/3 (1, 3, 10, 30, ...)."""
    ones = abs(math.log10(lr) - round(math.log10(lr))) < 1e-6
    step = 3.0 if ones == up else 10 / 3
    return float(f"{(lr * step if up else lr / step):.3g}")


def _rising_edge(grid: list[float], best: int, heads: dict) -> bool | None:
    """``True`` (top) or ``False`` (bottom) when the best lr is an end of the grid and beats its neighbour (the
    score still rises towards that end), else ``None`` (a plateau reaching an end is not an edge)."""
    if len(grid) > 1 and best == len(grid) - 1 and heads[grid[-1]][2] > heads[grid[-2]][2]:
        return True
    if len(grid) > 1 and best == 0 and heads[grid[0]][2] > heads[grid[1]][2]:
        return False
    return None


def dense_probe(train: DenseFeatures, test: DenseFeatures, names: Sequence[str], lrs: Sequence[float] = LRS,
                epochs: int = 10, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0,
                max_extensions: int = 4) -> dict:
    """Train a grid of per-token linear heads, choose one on held-out train (mean IoU), score it on test.

    When the best lr is at an end of the grid, the grid grows past that end (up to ``max_extensions`` more
    values each way) until the best is inside it: a probe picked at its grid's edge is under-trained.

    Returns ``{"miou", "mean_acc", "pixel_acc", "per_class_iou"}`` on test for the chosen head, ``"best"``
    (its lr, held-out mIoU, whether it is still at the grid's edge) and ``"grid"`` (held-out mIoU per lr).
    """
    if train.tokens.shape[-1] != test.tokens.shape[-1]:
        raise ValueError(f"train and test tokens differ in dimension ({train.tokens.shape[-1]} vs "
                         f"{test.tokens.shape[-1]})")
    n_classes, n = len(names), len(train.tokens)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * n))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    mu = train.tokens[tr_idx].mean((0, 1, 2))
    sd = train.tokens[tr_idx].std((0, 1, 2)).clamp(min=1e-6)
    x_all = (train.tokens - mu) / sd
    y_all = _targets(train.masks, tuple(train.masks[0].shape))
    heads: dict[float, tuple[Tensor, Tensor, float]] = {}
    grid, grown = sorted(lrs), {True: 0, False: 0}
    while True:
        new = [lr for lr in grid if lr not in heads]
        weight, bias = _train_heads(x_all[tr_idx], y_all[tr_idx], new, n_classes, epochs, batch_size, seed + 1)
        for k, lr in enumerate(new):
            conf = _test_confusion(x_all[val_idx], list(y_all[val_idx]), weight[k], bias[k], n_classes)
            heads[lr] = (weight[k], bias[k], segmentation_scores(conf, names)["miou"])
        best = max(range(len(grid)), key=lambda i: (heads[grid[i]][2], -i))  # the smaller lr wins a tie
        edge = _rising_edge(grid, best, heads)
        if edge is None or grown[edge] >= max_extensions:
            break
        grown[edge] += 1
        grid = grid + [_next_lr(grid[-1], True)] if edge else [_next_lr(grid[0], False)] + grid
    w, b, val = heads[grid[best]]
    conf = _test_confusion((test.tokens - mu) / sd, test.masks, w, b, n_classes)
    return {**segmentation_scores(conf, names),
            "best": {"lr": grid[best], "val_miou": val, "at_grid_edge": _rising_edge(grid, best, heads) is not None},
            "grid": [{"lr": lr, "val_miou": heads[lr][2]} for lr in grid],
            "train_images": n, "epochs": epochs}


def dense_markdown(results: dict[str, dict]) -> str:
    """Tables of each dense protocol that ran: the linear probe (mIoU, pixel accuracy, per-class IoU),
    Hummingbird retrieval, overclustering; models as rows."""
    if not results:
        return ""
    lines: list[str] = []
    linear = {m: r for m, r in results.items() if "miou" in r}
    if linear:
        lines += _linear_markdown(linear)
    hbird = {m: r["hbird"] for m, r in results.items() if "hbird" in r}
    if hbird:
        lines += ["", "### Hummingbird in-context retrieval (k = 30 cosine neighbours, softmax at T = 0.02): test %",
                  "",
                  "| model | mIoU | pixel acc | mean acc | memory (patches) |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['mean_acc']:.2f} | {r['memory']} |"
                  for m, r in hbird.items()]
    over = {m: r["overcluster"] for m, r in results.items() if "overcluster" in r}
    if over:
        ks = list(next(iter(over.values())))
        lines += ["", "### Overclustering (K-means of the test patch tokens; K = classes: Hungarian, above: "
                  "many-to-one): mIoU %, mean over seeds", "", "| model | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        lines += [f"| {m} | " + " | ".join(f"{r[k]['miou']:.2f}" if k in r else "—" for k in ks) + " |"
                  for m, r in over.items()]
    first = next(iter(results.values()))
    if "mask_size" in first:
        size = first["mask_size"]
        lines += ["", f"Masks scored at {size} x {size} px (--mask-size)." if size else
                  "Masks scored at their full size (--mask-size 0)."]
    return "\n".join(lines).lstrip("\n") + "\n"


def _linear_markdown(results: dict[str, dict]) -> list[str]:
    """The linear probe's table, its lr grid and the per-class IoU."""
    names = list(next(iter(results.values()))["per_class_iou"])
    lines = ["### Dense probe (linear per patch token, logits upsampled to the mask): test %", "",
             "| model | mIoU | pixel acc | mean acc | chosen lr | input px / patch | train images, epochs |",
             "|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        cells = [f"{r[k]:.2f}" for k in ("miou", "pixel_acc", "mean_acc")]
        edge = " (grid edge)" if r["best"].get("at_grid_edge") else ""
        shape = f"{r['input_size']} / {r['patch_size']}" if "input_size" in r else "?"
        run = f"{r['train_images']}, {r['epochs']}" if "train_images" in r else "?"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {r['best']['lr']:g}{edge} | {shape} | {run} |")
    grid = ", ".join(f"{g['lr']:g}" for g in next(iter(results.values()))["grid"])
    lines += ["", f"lr grid {grid}, chosen on a held-out tenth of train by mIoU."]
    lines += ["", "Per-class IoU (— : class absent from the test masks and never predicted)", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, r in results.items():
        cells = ["—" if v is None else f"{v:.1f}" for v in r["per_class_iou"].values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class DenseSettings:
    """How :func:`evaluate_dense` runs.

    Attributes:
        train_images: Train images the heads learn from (the first ones, by file name; 0: all).
        epochs: Passes of the heads over them.
        size: Model input side (default: each model's global view size).
        pixel_floor: Also probe each patch's raw pixels (patch size of the first model).
        random_floor: Also probe the first model's backbone at its run's random init (a pwself run).
        cache_dir: Where tokens are cached (``None``: nowhere).
        device: Where the backbones run.
        progress: Progress bars.
        heldout: Score on this many train images (a seeded draw the probe does not learn from) instead of the
            test split, which is then never opened (0: score on test). Tuning chooses on it.
        mask_size: Side masks are scored at (nearest resize to a square, as the images): ``None`` the model's
            input side, 0 each mask's full size (slow and large for photos).
        protocols: Which of :data:`PROTOCOLS` run: ``linear`` (the trained probe), ``hbird`` (in-context
            retrieval), ``overcluster`` (K-means); the same tokens serve all.
        hbird_memory: Patches in Hummingbird's memory (0: every labelled train patch).
        overcluster_ks: Cluster counts of overclustering (0: the number of classes).
        root: The dense dataset (``pwself make-scenes`` layout, or a user's own images and masks) when the
            settings go through :func:`pwself.eval.protocols.evaluate`.
    """

    train_images: int = 2000
    epochs: int = 10
    size: int | None = None
    pixel_floor: bool = False
    cache_dir: str | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    heldout: int = 0
    mask_size: int | None = None
    protocols: tuple[str, ...] = ("linear",)
    hbird_memory: int = 0
    overcluster_ks: tuple[int, ...] = (0, 100, 300)
    random_floor: bool = False
    root: str | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"dense protocols {','.join(self.protocols) or '(none)'}: use one or more of "
                             f"{','.join(PROTOCOLS)}, e.g. --protocols linear,hbird")
        if self.mask_size is not None and self.mask_size < 0 or self.hbird_memory < 0:
            raise ValueError(f"--mask-size {self.mask_size} --hbird-memory {self.hbird_memory}: use 0 or more "
                             "(--mask-size 0: each mask's full size; --hbird-memory 0: every train patch)")


PROTOCOLS = ("linear", "hbird", "overcluster")
"""The dense protocols: the linear probe, Hummingbird in-context retrieval, overclustering."""


def _subset(split: DenseSplit, idx: list[int]) -> DenseSplit:
    return DenseSplit([split.images[i] for i in idx], [split.masks[i] for i in idx], split.channels, split.size,
                      split.mask_size)


def _split_pair(root: str, channels: int, size: int, train_images: int, heldout: int = 0, mask_size: int = 0
                ) -> tuple[DenseSplit, DenseSplit]:
    """The probe's train images and the images it is scored on: test, or with ``heldout`` that many train
    images (a seeded draw, the same for every model) that the probe does not learn from."""
    train = open_dense(root, "train", channels, size, mask_size)
    if heldout:
        if heldout >= len(train):
            raise DatasetError(f"{root}/train has {len(train)} images, too few to hold {heldout} out for the dense "
                               f"score: pass --dense-heldout {max(1, len(train) // 5)}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345)).tolist()
        test, train = _subset(train, sorted(perm[:heldout])), _subset(train, sorted(perm[heldout:]))
    else:
        test = open_dense(root, "test", channels, size, mask_size)
    if train_images:
        train = _subset(train, list(range(min(train_images, len(train)))))
    return train, test


def _source_features(encode: Encoder, key: dict, splits: tuple[DenseSplit, DenseSplit], mean: list[float],
                     std: list[float], s: DenseSettings) -> tuple[DenseFeatures, DenseFeatures]:
    """Train and test tokens of one encoder, from the cache when it has them."""
    out = []
    for name, split in zip(("train", "test"), splits):
        ident = {**key, "split": name, "content": fingerprint(split), "n": len(split), "size": split.size,
                 "mean": mean, "std": std, **({"mask_size": split.mask_size} if split.mask_size else {})}
        path = Path(s.cache_dir) / f"dense_{cache_key(ident)}.pt" if s.cache_dir else None

        def compute(split: DenseSplit = split, name: str = name) -> dict:
            f = dense_features(encode, split, mean, std, device=s.device, progress=s.progress,
                               desc=f"dense {name}")
            return {"tokens": f.tokens, "masks": f.masks}

        cached = load_or_compute(path, compute)
        out.append(DenseFeatures(cached["tokens"], list(cached["masks"])))
    return out[0], out[1]


def probe_encoder(encode: Encoder, key: dict, root: str, channels: int, size: int, mean: list[float],
                  std: list[float], settings: DenseSettings, names: list[str] | None = None) -> dict:
    """The dense protocols of one encoder on the dataset at ``root`` (images at ``size``, masks at the settings'
    mask size); ``key`` identifies the encoder's weights for the cache. The linear probe's scores are the top
    level of the result, Hummingbird's and overclustering's under ``hbird`` and ``overcluster``."""
    from pwself.eval.incontext import hummingbird, overclustering

    mask_size = size if settings.mask_size is None else settings.mask_size
    splits = _split_pair(root, channels, size, settings.train_images, settings.heldout, mask_size)
    names = names or dense_classes(root, list(splits))
    clock = time.perf_counter()
    train, test = _source_features(encode, {**key, "root": str(root)}, splits, mean, std, settings)
    seconds = {"features": time.perf_counter() - clock}
    res: dict = {}
    runs = {"linear": lambda: res.update(dense_probe(train, test, names, epochs=settings.epochs)),
            "hbird": lambda: res.update(hbird=hummingbird(train.tokens, train.masks, test.tokens, test.masks, names,
                                                          settings.hbird_memory)),
            "overcluster": lambda: res.update(overcluster=overclustering(test.tokens, test.masks, names,
                                                                         settings.overcluster_ks))}
    for name in settings.protocols:
        clock = time.perf_counter()
        runs[name]()
        seconds[name] = time.perf_counter() - clock
    return {**res, "protocols": list(settings.protocols), "mask_size": mask_size, "names": list(names),
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "scored_on": f"{settings.heldout} held-out train images" if settings.heldout else "test"}


PIXEL_ROW = "raw pixels (floor)"


def pixel_row(src, root: str, settings: DenseSettings, names: list[str] | None = None) -> dict:  # noqa: ANN001
    """The dense probe on each patch's raw pixels, at the patch size, channels and input side of ``src`` (a
    :class:`~pwself.eval.source.FeatureSource`)."""
    patch, size = src.backbone.patch_embed.patch_size[0], settings.size or src.size
    res = probe_encoder(pixel_encoder(patch), {"weights": f"pixels{patch}"}, root,
                        src.backbone.patch_embed.proj.in_channels, size, src.mean, src.std, settings, names)
    return {**res, "input_size": size, "patch_size": patch}


def random_row(src, root: str, settings: DenseSettings, names: list[str] | None = None) -> dict:  # noqa: ANN001
    """``{name: result}`` of the dense protocols on ``src``'s backbone at its run's random init (empty, said in
    the log, when ``src`` is not a pwself run)."""
    from pwself.eval.source import random_init_like

    floor = random_init_like(src)
    if floor is None:
        log.info("no random-init floor for %s: it is not a pwself run", src.name)
        return {}
    res = probe_encoder(backbone_encoder(floor.backbone), {"weights": floor.key}, root,
                        floor.backbone.patch_embed.proj.in_channels, settings.size or floor.size, floor.mean,
                        floor.std, settings, names)
    return {floor.name: {**res, "input_size": settings.size or floor.size,
                         "patch_size": floor.backbone.patch_embed.patch_size[0]}}


def evaluate_dense(sources: list, root: str, settings: DenseSettings = DenseSettings()) -> dict[str, dict]:
    """Dense probe of every :class:`~pwself.eval.source.FeatureSource` on the dense dataset at ``root``
    (``{model name: result}``), with the raw-pixel floor row when ``settings.pixel_floor``."""
    results: dict[str, dict] = {}
    names: list[str] | None = None
    for src in sources:
        size = settings.size or src.size
        patch = src.backbone.patch_embed.patch_size[0]
        if size % patch:
            raise DatasetError(f"input side {size} is not a multiple of the patch size {patch}: pass --size "
                               f"{max(patch, size // patch * patch)}")
        channels = src.backbone.patch_embed.proj.in_channels
        src.backbone.eval()
        results[src.name] = probe_encoder(backbone_encoder(src.backbone), {"weights": src.key}, root, channels,
                                          size, src.mean, src.std, settings, names)
        results[src.name].update(input_size=size, patch_size=patch)
        names = results[src.name]["names"]  # the masks are scanned for the first model only
    if settings.pixel_floor and sources:
        results[PIXEL_ROW] = pixel_row(sources[0], root, settings, names)
    if settings.random_floor and sources:
        results.update(random_row(sources[0], root, settings, names))
    for name, res in results.items():
        if "best" in res and res["best"]["at_grid_edge"]:
            log.warning("dense probe of %s: the chosen lr %g is at the edge of the grid (%g..%g): the best lr may "
                        "lie beyond it", name, res["best"]["lr"], res["grid"][0]["lr"], res["grid"][-1]["lr"])
    return results


DESCRIPTION = (
    "Frozen patch tokens (last block, after the final norm), scored against masks brought to the model's input "
    "side (--mask-size). linear: one linear layer per token, logits upsampled bilinearly, a grid of learning "
    "rates chosen on held-out train. hbird: each test patch labelled by its 30 most similar train patches "
    "(Hummingbird, no training). overcluster: K-means of the test patches mapped to classes (no training). "
    "Data: DIR/{train,test}/images/* with DIR/{train,test}/masks/STEM.png (class index per pixel, 255 = "
    "ignore) and optionally DIR/classes.json (docs/evaluation.md)."
)


def _flags(p: argparse.ArgumentParser, alone: bool) -> None:
    p.add_argument("--data", required=True, help="dense dataset folder (make one with `pwself make-scenes OUT`)")
    p.add_argument("--train-images", type=int, default=2000, help="train images the heads learn from (0: all; "
                   "default 2000)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each head (default 10)")
    p.add_argument("--size", type=int, help="model input side (default: each model's global view size)")
    p.add_argument("--pixel-floor", action="store_true", help="also probe each patch's raw pixels (the floor)")
    p.add_argument("--random-floor", action="store_true", help="also the first model's backbone at its run's "
                   "random init (the floor a pwself run must beat)")
    p.add_argument("--protocols", default="linear", help="comma-separated: linear (a trained linear probe), hbird "
                   "(Hummingbird in-context retrieval, no training), overcluster (K-means, no training); "
                   "default linear")
    p.add_argument("--mask-size", type=int, help="side masks are scored at (default: the model's input side; "
                   "0: each mask's full size, slow for photos)")
    p.add_argument("--hbird-memory", type=int, default=0, help="patches in Hummingbird's memory, drawn toward "
                   "rare classes (default 0: every labelled train patch)")


def _from_flags(args: argparse.Namespace, alone: bool) -> DenseSettings:
    from pwself.config import split_choices
    from pwself.runtime import resolve_device

    if args.epochs < 1 or args.train_images < 0 or (args.size is not None and args.size < 1):
        raise ValueError(f"--epochs {args.epochs} --train-images {args.train_images} --size {args.size}: use "
                         "--epochs 1 or more, --train-images 0 (all) or more, --size 1 or more (e.g. --size 224)")
    return DenseSettings(args.train_images, args.epochs, args.size, args.pixel_floor, args.cache_dir or None,
                         resolve_device(args.device), not args.no_progress, mask_size=args.mask_size,
                         protocols=tuple(split_choices(args.protocols)), hbird_memory=args.hbird_memory,
                         random_floor=args.random_floor, root=args.data)


def _run(source, options: DenseSettings, settings) -> dict:  # noqa: ANN001 - a FeatureSource, EvalSettings
    if not options.root:
        raise ValueError("the dense probe needs a dense dataset: pass --dense DIR (made by pwself make-scenes)")
    options = replace(options, device=next(source.backbone.parameters()).device, pixel_floor=False,
                      random_floor=False)
    return evaluate_dense([source], options.root, options)[source.name]


def _model_input(options: DenseSettings) -> tuple[int, int]:
    from pwself.data.dense import dense_input

    channels, size = dense_input(options.root)
    return channels, options.size or size


def _finish(results: dict, sources: list, options: DenseSettings) -> None:
    """The floors, on the classes the first model scanned."""
    if not sources:
        return
    names = results[sources[0].name]["names"]
    if options.pixel_floor:
        results[PIXEL_ROW] = pixel_row(sources[0], options.root, options, names)
    if options.random_floor:
        results.update(random_row(sources[0], options.root, options, names))


def _scores(res: dict) -> dict[str, float]:
    scores = {"dense mIoU": res["miou"]} if "miou" in res else {}
    return {**scores, **({"Hummingbird mIoU": res["hbird"]["miou"]} if "hbird" in res else {})}


PROTOCOL = Protocol("dense", "dense protocols scored as mIoU: a linear probe on each patch token, Hummingbird "
                    "retrieval, overclustering", DenseSettings, _run,
                    lambda per_model, note: dense_markdown(per_model).splitlines(), _scores, features=False,
                    flags=_flags, from_flags=_from_flags, in_eval=False, description=DESCRIPTION,
                    model_input=_model_input, finish=_finish)
