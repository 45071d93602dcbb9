"""Weighted k-NN classification on frozen features (EVAL_PROTOCOLS §1, dino/dinov2)."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pwself.eval.registry import Protocol

__all__ = ["knn_classify", "KnnSettings", "PROTOCOL"]

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 512,
    num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """Weighted kNN accuracy for a grid of ``k`` in one pass (dinov2's ``KnnModule``).

    Neighbours are the ``max(ks)`` most cosine-similar train rows; each votes for its label with weight
    ``softmax(sim / T)`` over those neighbours, the score of class ``c`` under ``k`` being the prefix sum
    of the first ``k`` votes. The per-query softmax denominator does not change the ranking, so every
    ``k`` gives dino's ``exp(sim / T)`` decision. Top-5 looks at ``min(5, k)`` predictions (dino).
    Similarities are computed in float32; tied scores are resolved towards the lower class index.

    Args:
        train_features: ``[N, D]`` L2-normalized bank.
        train_labels: ``[N]`` labels in ``0..C-1``.
        test_features: ``[M, D]`` L2-normalized queries.
        test_labels: ``[M]`` labels.
        ks: Neighbour counts.
        temperature: Vote temperature ``T``.
        chunk_size: Queries per matmul.
        num_classes: ``C`` (default: ``max label + 1``).

    Returns:
        ``{k: {"top1": %, "top5": %}}``.

    Example:
        >>> import torch, pwself
        >>> bank = torch.nn.functional.normalize(torch.eye(4).repeat(5, 1) + 0.01 * torch.rand(20, 4), dim=1)
        >>> labels = torch.arange(4).repeat(5)
        >>> pwself.knn_classify(bank, labels, bank[:4], labels[:4], ks=(1, 5))[5]["top1"]
        100.0
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension ({train_features.shape[1]} vs {test_features.shape[1]})"
        )
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN needs labels: the dataset has unlabelled images (label -1)")
    ks = sorted(set(int(k) for k in ks))
    k_max = ks[-1]
    if k_max > len(train_features):
        raise ValueError(f"k={k_max} is larger than the train bank ({len(train_features)} images): lower k")
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    bank = train_features.float().T.contiguous()
    hits = {k: torch.zeros(2) for k in ks}
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start : start + chunk_size].float()
        y = test_labels[start : start + chunk_size]
        sims, idx = (q @ bank).topk(k_max, dim=1)
        weights = F.softmax(sims / temperature, dim=1)  # stable: subtracts the row max
        votes = F.one_hot(train_labels[idx], c).float() * weights[..., None]  # [q, k_max, C]
        cum = votes.cumsum(1)
        for k in ks:
            scores = cum[:, k - 1]
            # Stable descending sort: equal scores keep the lower class index first.
            pred = torch.sort(scores, dim=1, descending=True, stable=True).indices
            hits[k][0] += (pred[:, 0] == y).sum()
            hits[k][1] += (pred[:, : min(5, k, c)] == y[:, None]).any(1).sum()
    n = len(test_features)
    return {k: {"top1": float(100 * h[0] / n), "top5": float(100 * h[1] / n)} for k, h in hits.items()}


@dataclass(frozen=True)
class KnnSettings:
    """The kNN protocol's knobs.

    Attributes:
        ks: Neighbour counts (one pass gives them all).
        temperature: Vote temperature ``T``.
    """

    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07


def _flags(p: argparse.ArgumentParser, alone: bool) -> None:
    p.add_argument("--ks", default="10,20,100,200", help="comma-separated k values (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")


def _from_flags(args: argparse.Namespace, alone: bool) -> KnnSettings:
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        ks = (0,)
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks {args.ks!r}: give whole numbers >= 1 separated by commas, e.g. --ks 10,20")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature {args.temperature}: use a finite value > 0, e.g. 0.07")
    return KnnSettings(ks, args.temperature)


def _check(options: KnnSettings, data: Any) -> None:
    if min(options.ks) > len(data.train):
        raise ValueError(f"--ks {','.join(map(str, options.ks))}: every k is larger than the train bank "
                         f"({len(data.train)} images): use k <= {len(data.train)}")


def _run(feats: dict[str, tuple[Tensor, Tensor]], options: KnnSettings, settings: Any) -> dict[int, dict[str, float]]:
    bank = len(feats["train"][0])
    ks = tuple(k for k in options.ks if k <= bank)
    if not ks:
        log.warning("every k of %s is larger than the bank (%d images): k = %d", options.ks, bank, bank)
        ks = (bank,)
    return knn_classify(*feats["train"], *feats["test"], ks=ks, temperature=options.temperature)


def _table(per_model: dict[str, Any], note: str) -> list[str]:
    ks = list(next(iter(per_model.values())).keys())
    lines = [f"### kNN (weighted, T = 0.07){', ' + note if note else ''}: top-1 / top-5 %", "",
             "| model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {name} | " + " | ".join(f"{res[k]['top1']:.2f} / {res[k]['top5']:.2f}" for k in ks) + " |"
              for name, res in per_model.items()]
    return [*lines, ""]


PROTOCOL = Protocol("knn", "weighted kNN (T=0.07, k grid) on frozen features", KnnSettings, _run, _table,
                    scores=lambda res: {f"kNN k={k}": r["top1"] for k, r in res.items()},
                    flags=_flags, from_flags=_from_flags, check=_check)
