"""Linear probe on frozen (cached) features: a grid of heads trained in one pass, chosen on held-out train.

Like dinov2's ``eval/linear.py``: every (lr, weight decay) head is its own SGD group (momentum 0.9), the
heads share each batch, the learning rate follows a per-iteration cosine, the best head is picked on a
validation split carved from train (strict ``>``, first wins a tie) and only that head is reported on test.
Features are cached, so no augmentation (dinov2's ``log_regression`` protocol, with SGD); they are
standardized with the statistics of the train part first.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pwself.eval.registry import Protocol

__all__ = ["linear_probe", "LinearSettings", "PROTOCOL"]


def _accuracy(logits: Tensor, y: Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return float(100 * (top[..., 0] == y).float().mean()), float(100 * (top == y[..., None]).any(-1).float().mean())


def _train_heads(x_tr: Tensor, y_tr: Tensor, grid: list[tuple[float, float]], n_classes: int, epochs: int,
                 batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """One linear head per (lr, wd) of ``grid``, trained together: SGD with momentum 0.9, cosine lr."""
    h, d = len(grid), x_tr.shape[1]
    weight = (torch.randn(h, d, n_classes, generator=g) * 0.01).requires_grad_(True)
    bias = torch.zeros(h, 1, n_classes, requires_grad=True)
    lr_h = torch.tensor([lr * batch_size / 256 for lr, _ in grid])[:, None, None]
    wd_h = torch.tensor([wd for _, wd in grid])[:, None, None]
    mom_w, mom_b = torch.zeros_like(weight), torch.zeros_like(bias)
    total, it = epochs * max(1, math.ceil(len(x_tr) / batch_size)), 0
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=g)
        for start in range(0, len(x_tr), batch_size):
            idx = order[start : start + batch_size]
            logits = torch.einsum("bd,hdc->hbc", x_tr[idx], weight) + bias
            # Sum over heads of the mean CE: heads share no parameters, so each trains independently.
            ce = F.cross_entropy(logits.flatten(0, 1), y_tr[idx].repeat(h), reduction="none")
            loss = ce.view(h, -1).mean(1).sum()
            gw, gb = torch.autograd.grad(loss, [weight, bias])
            scale = 0.5 * (1 + math.cos(math.pi * it / total))
            with torch.no_grad():
                gw = gw + wd_h * weight
                mom_w.mul_(0.9).add_(gw)
                mom_b.mul_(0.9).add_(gb)
                weight -= lr_h * scale * mom_w
                bias -= lr_h * scale * mom_b
            it += 1
    return weight, bias


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0),
    weight_decays: Sequence[float] = (0.0, 1e-4),
    epochs: int = 30,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Train a grid of linear classifiers and report the one best on held-out train data.

    Args:
        train_features: ``[N, D]`` frozen features of the labelled train split.
        train_labels: ``[N]`` labels in ``0..C-1``.
        test_features: ``[M, D]`` features of the test split (never used for the choice).
        test_labels: ``[M]`` labels.
        lrs: Learning rates (for batch 256; scaled linearly with ``batch_size``).
        weight_decays: Weight decays.
        epochs: Passes over the train part.
        batch_size: Mini-batch size.
        val_fraction: Share of train held out for the choice.
        seed: Seed of the split, the init and the batch order.

    Returns:
        ``{"top1", "top5"}`` on test for the chosen head, ``"best"`` (its lr, wd, val top-1) and ``"grid"``
        (val top-1 of every head).
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in dimension ({train_features.shape[1]} vs "
                         f"{test_features.shape[1]})")
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("the linear probe needs labels: the dataset has unlabelled images (label -1)")
    g = torch.Generator().manual_seed(seed)
    n = len(train_features)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(val_fraction * n)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    # Standardize with statistics of the train part: L2-normalized features have tiny coordinates, which
    # would otherwise push the best learning rate to the edge of any fixed grid.
    mu = train_features[tr_idx].float().mean(0)
    sd = train_features[tr_idx].float().std(0).clamp(min=1e-6)
    x_tr, y_tr = (train_features[tr_idx].float() - mu) / sd, train_labels[tr_idx]
    x_val, y_val = (train_features[val_idx].float() - mu) / sd, train_labels[val_idx]
    c = int(max(train_labels.max(), test_labels.max())) + 1
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    h = len(grid)
    weight, bias = _train_heads(x_tr, y_tr, grid, c, epochs, batch_size, g)
    with torch.no_grad():
        val_logits = torch.einsum("bd,hdc->hbc", x_val, weight) + bias
        val_top1 = [float(100 * (val_logits[k].argmax(-1) == y_val).float().mean()) for k in range(h)]
        best = 0
        for k in range(1, h):
            if val_top1[k] > val_top1[best]:
                best = k
        test_logits = ((test_features.float() - mu) / sd) @ weight[best] + bias[best]
        top1, top5 = _accuracy(test_logits, test_labels)
    return {
        "top1": top1,
        "top5": top5,
        "best": {"lr": grid[best][0], "weight_decay": grid[best][1], "val_top1": val_top1[best]},
        "grid": [{"lr": lr, "weight_decay": wd, "val_top1": v} for (lr, wd), v in zip(grid, val_top1)],
    }


@dataclass(frozen=True)
class LinearSettings:
    """The linear probe's knobs.

    Attributes:
        epochs: Epochs of each head of the grid.
    """

    epochs: int = 30


def _flags(p: argparse.ArgumentParser, alone: bool) -> None:
    p.add_argument("--epochs", type=int, default=30, help="epochs of each linear head (default 30)")


def _from_flags(args: argparse.Namespace, alone: bool) -> LinearSettings:
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: use at least 1")
    return LinearSettings(args.epochs)


def _table(per_model: dict[str, Any], note: str) -> list[str]:
    lines = [f"### Linear probe{', ' + note if note else ''}", "",
             "| model | top-1 % | top-5 % | chosen lr | chosen wd |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {res['top1']:.2f} | {res['top5']:.2f} | {res['best']['lr']:g} | "
              f"{res['best']['weight_decay']:g} |" for name, res in per_model.items()]
    return [*lines, ""]


PROTOCOL = Protocol("linear", "linear probe on frozen features (lr x wd grid, chosen on held-out train)",
                    LinearSettings, lambda feats, options, settings: linear_probe(*feats["train"], *feats["test"],
                                                                                  epochs=options.epochs),
                    _table, scores=lambda res: {"linear": res["top1"]}, flags=_flags, from_flags=_from_flags)
