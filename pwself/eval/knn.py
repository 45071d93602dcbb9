"""Weighted k-NN classification on frozen features (EVAL_PROTOCOLS §1, dino/dinov2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:

    pass

__all__ = ["knn_classify"]


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
