"""Metrics: the ranking metrics of the reference code (EVAL_PROTOCOLS §3-§5: trapezoidal AP, revisited mAP, GeM,
whitening) and mmsegmentation's segmentation scores from a confusion matrix (the dense protocols').

Transcriptions of revisitop's ``compute_ap``/``compute_map`` (copied in dino's ``utils.py``), of the Holidays
``score_ap_from_ranks_1`` used by dino's copy detection, of cirtorch's/dino's GeM, and of dino's ``PCA``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "compute_ap",
    "compute_map",
    "revisited_map",
    "score_ap_from_ranks",
    "gem",
    "PCAWhitening",
    "learn_whitening_dino",
    "confusion_matrix",
    "segmentation_scores",
]


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Trapezoidal average precision (revisitop ``compute_ap``).

    Args:
        ranks: Sorted 0-based positions of the retrieved positives (junk already removed).
        nres: Total number of positives.

    Returns:
        ``sum_j (P0_j + P1_j) / (2 nres)`` with ``P0_j = 1 if r_j == 0 else j / r_j`` and
        ``P1_j = (j + 1) / (r_j + 1)``. A single positive at position 1 scores 0.25.
    """
    if nres <= 0:
        raise ValueError("compute_ap: a query with no positives has no AP")
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


score_ap_from_ranks = compute_ap  # Holidays' score_ap_from_ranks_1 is the same trapezoid (EVAL_PROTOCOLS §4)


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, list[float], np.ndarray]:
    """mAP and mP@k over queries with junk removal (revisitop ``compute_map``).

    Args:
        ranks: ``[n_db, n_q]`` int, column ``i`` = database indices for query ``i``, best first.
        gnd: Per query a dict with ``ok`` (positives) and optionally ``junk`` (ignored) index lists.
        kappas: ``k`` values for precision at k.

    Returns:
        ``(mAP, per-query AP (NaN for queries without positives), mP@k list, per-query P@k [n_q, K])``.
        Queries with no positives are left out of the means; if all are, ``ValueError``.
    """
    n_q = len(gnd)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(kappas)), np.nan)
    for i in range(n_q):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        col = ranks[:, i]
        pos = np.sort(np.flatnonzero(np.isin(col, ok)))
        jpos = np.sort(np.flatnonzero(np.isin(col, junk)))
        # Remove junk: shift each positive's position by the number of junk items before it.
        pos = pos - np.searchsorted(jpos, pos, side="left") if jpos.size else pos
        aps[i] = compute_ap(pos, len(ok))
        p1 = pos + 1  # 1-based
        for j, k in enumerate(kappas):
            kq = min(max(p1.max(), 0), k) if p1.size else k
            prs[i, j] = (p1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("compute_map: no query has a positive; check the ground truth")
    return float(aps[valid].mean()), aps, [float(v) for v in prs[valid].mean(0)], prs


def revisited_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
    """Easy / Medium / Hard mAP and mP@k of the revisited Oxford/Paris protocol (x100).

    Args:
        ranks: ``[n_db, n_q]`` rankings.
        gnd: Per query ``{"easy": [...], "hard": [...], "junk": [...]}``.
        kappas: ``k`` values for precision at k.

    Returns:
        ``{"E"|"M"|"H": {"mAP": %, "mP@k": [% ...]}}``; a setup where no query has positives is omitted.
    """
    setups = {
        "E": lambda g: {"ok": list(g["easy"]), "junk": list(g["junk"]) + list(g["hard"])},
        "M": lambda g: {"ok": list(g["easy"]) + list(g["hard"]), "junk": list(g["junk"])},
        "H": lambda g: {"ok": list(g["hard"]), "junk": list(g["junk"]) + list(g["easy"])},
    }
    out = {}
    for name, make in setups.items():
        try:
            m, _, mp, _ = compute_map(ranks, [make(g) for g in gnd], kappas)
        except ValueError:
            continue
        out[name] = {"mAP": round(100 * m, 2), "mP@k": [round(100 * v, 2) for v in mp], "kappas": list(kappas)}
    return out


def gem(tokens: Tensor, p: float = 4.0, eps: float = 1e-6) -> Tensor:
    """Generalized-mean pooling over tokens: ``[B, T, D] -> [B, D]`` (clamp at ``eps`` before the power)."""
    return tokens.clamp(min=eps).pow(p).mean(1).pow(1.0 / p)


class PCAWhitening:
    """dino's ``PCA(dim, whit=0.5)``: eigen-decomposition of a covariance, eigenvalue floor, projection.

    ``train_pca(C)`` floors eigenvalues at ``1e-5 * max``, sorts descending, keeps ``dim`` and sets
    ``P = diag(lambda^-whit) V^T``; ``apply(x) = x P^T`` (``mean`` subtracted first only if set).
    """

    def __init__(self, dim: int | None = None, whit: float = 0.5) -> None:
        self.dim, self.whit = dim, whit
        self.mean: np.ndarray | None = None
        self.P: np.ndarray | None = None

    def train_pca(self, cov: np.ndarray) -> PCAWhitening:
        eigval, eigvec = np.linalg.eigh(cov)
        floor = 1e-5 * eigval.max()
        eigval = np.where(eigval < floor, floor, eigval)
        order = np.argsort(-eigval, kind="stable")
        dim = self.dim or len(eigval)
        eigval, eigvec = eigval[order][:dim], eigvec[:, order][:, :dim]
        self.P = np.diag(eigval ** (-self.whit)) @ eigvec.T
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.P is None:
            raise RuntimeError("PCAWhitening.apply before train_pca")
        if self.mean is not None:
            x = x - self.mean
        return x @ self.P.T


def learn_whitening_dino(whitening_features: np.ndarray, centered_cov: bool = False) -> tuple[np.ndarray, PCAWhitening]:
    """dino's copy-detection whitening: ``mu`` = mean of the whitening set, covariance ``F^T F / N`` on the
    **uncentred** features (the reference quirk; ``centered_cov=True`` centres them), full-dimension PCA.

    Returns:
        ``(mu, pca)``; apply as ``pca.apply(x - mu)``.
    """
    f = np.asarray(whitening_features, dtype=np.float64)
    mu = f.mean(0)
    g = f - mu if centered_cov else f
    cov = g.T @ g / len(g)
    return mu, PCAWhitening(dim=f.shape[1], whit=0.5).train_pca(cov)


def l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalization (``x / max(||x||, 1e-12)``)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def confusion_matrix(pred: Tensor, gt: Tensor, n_classes: int, ignore_index: int = 255,
                     n_pred: int | None = None) -> Tensor:
    """``[C, P]`` counts, rows = ground truth, columns = prediction (``P = n_pred``, by default the ``C``
    classes; more for cluster indices), ignored pixels left out."""
    n_pred = n_pred or n_classes
    valid = gt != ignore_index
    idx = gt[valid].long() * n_pred + pred[valid].long()
    return torch.bincount(idx, minlength=n_classes * n_pred).view(n_classes, n_pred)


def segmentation_scores(conf: Tensor, names: Sequence[str]) -> dict:
    """mmsegmentation's metrics from a confusion matrix: ``miou`` and ``mean_acc`` (%, over classes present
    in the ground truth or predictions), ``pixel_acc`` (%), ``per_class_iou`` (``None`` for an absent class)."""
    conf = conf.double()
    inter = conf.diagonal()
    area_gt, area_pred = conf.sum(1), conf.sum(0)
    union = area_gt + area_pred - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
    acc = torch.where(area_gt > 0, inter / area_gt.clamp(min=1), torch.full_like(inter, math.nan))
    return {
        "miou": float(100 * iou.nanmean()), "mean_acc": float(100 * acc.nanmean()),
        "pixel_acc": float(100 * inter.sum() / area_gt.sum().clamp(min=1)),
        "per_class_iou": {n: (None if math.isnan(v) else round(100 * v, 4)) for n, v in zip(names, iou.tolist())},
    }
