"""Dense protocols without training: in-context retrieval (Hummingbird) and overclustering (``docs/evaluation.md``).

**Hummingbird** (Balažević et al. 2023, "Towards In-context Scene Understanding"; parameters pinned to the
open-hummingbird-eval reproduction's ``hbird_eval.py``): a memory of the train images' L2-normalised patch
tokens, each labelled with its patch's class histogram; every test patch takes its ``k = 30`` most cosine-similar
memory patches and combines their histograms with softmax attention over the similarities at temperature
0.02; the combined histograms, upsampled bilinearly to the mask, give each pixel its class. With a memory size
the memory holds that many patches, the same number from each image, drawn with weight toward rare classes (a
patch's score is the summed count of the image's patches that contain each of its classes, times a uniform
draw; the lowest scores are kept). Two deliberate differences from the reproduction: ignored pixels (255)
are left out of the histograms (it counts them as class 0, Pascal VOC's background), and a patch with no
labelled pixel is not put in the memory; the mIoU is the confusion-matrix mIoU of the other dense protocols
(predictions are class indices, so no matching).

**Overclustering** (as in Leopart, CrIBo, DIP): K-means of the L2-normalised test patch tokens; each cluster is
mapped to a class through the pixel counts they share, one-to-one by the Hungarian algorithm when ``K`` is the
number of classes, many-to-one (each cluster to the class it overlaps most) above it; mIoU, averaged over
seeds. K-means is the few lines below rather than scikit-learn's: one seeded Lloyd loop in torch, on the
device the tokens are on, and no dependency for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pwself.data.dense import IGNORE_INDEX
from pwself.eval.metrics import confusion_matrix, segmentation_scores

__all__ = ["HBIRD_NEIGHBOURS", "HBIRD_TEMPERATURE", "patch_histograms", "hbird_memory", "hbird_labels",
           "hummingbird", "kmeans", "match_clusters", "overclustering"]

HBIRD_NEIGHBOURS = 30  # open-hummingbird-eval's n_neighbours
HBIRD_TEMPERATURE = 0.02  # its cross-attention beta


def patch_histograms(masks: Tensor, grid: tuple[int, int], n_classes: int) -> Tensor:
    """``[N, h, w, C]``: the fraction of each patch's labelled pixels in each class (all zeros for a patch
    without one), from ``[N, H, W]`` masks split into the ``h x w`` grid (any ``H, W``: adaptive pooling)."""
    valid = masks != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, masks, 0).long(), n_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    counts = F.adaptive_avg_pool2d(onehot, grid)
    total = counts.sum(1, keepdim=True)
    return (counts / total.clamp(min=1e-12)).permute(0, 2, 3, 1)


def hbird_memory(tokens: Tensor, hist: Tensor, memory_size: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(keys [M, D] L2-normalised, labels [M, C])`` of the train patches. ``memory_size`` 0: every labelled
    patch; else ``memory_size // N`` patches of each of the ``N`` images, rare classes first (module docstring)."""
    n, h, w, d = tokens.shape
    keys, labels = F.normalize(tokens.reshape(n, h * w, d).float(), dim=-1), hist.reshape(n, h * w, -1)
    labelled = labels.sum(-1) > 0
    per_image = memory_size // n if memory_size else 0
    if not per_image or per_image >= h * w:
        return keys[labelled], labels[labelled]
    present = labels > 0  # [N, P, C]
    frequency = present.sum(1, keepdim=True).float()  # patches of the image holding each class
    score = (present * frequency).sum(-1)  # [N, P]
    g = torch.Generator().manual_seed(seed)
    score = torch.where(labelled, score * torch.rand(score.shape, generator=g), torch.full_like(score, 1e6))
    idx = score.topk(per_image, dim=1, largest=False).indices  # [N, k]
    keys = keys.gather(1, idx[..., None].expand(-1, -1, d)).reshape(-1, d)
    labels = labels.gather(1, idx[..., None].expand(-1, -1, labels.shape[-1])).reshape(-1, labels.shape[-1])
    keep = labels.sum(-1) > 0  # an image with fewer labelled patches than its share
    return keys[keep], labels[keep]


@torch.no_grad()
def hbird_labels(queries: Tensor, keys: Tensor, labels: Tensor, k: int = HBIRD_NEIGHBOURS,
                 temperature: float = HBIRD_TEMPERATURE, chunk: int = 4096) -> Tensor:
    """``[Q, C]``: each query's ``k`` most cosine-similar keys' labels, weighted by the softmax of their
    similarities over ``temperature``."""
    q = F.normalize(queries.float(), dim=-1)
    k = min(k, len(keys))
    out = []
    for part in q.split(chunk):
        sim, idx = (part @ keys.T).topk(k, dim=1)
        attn = torch.softmax(sim / temperature, dim=1)
        out.append(torch.einsum("qk,qkc->qc", attn, labels[idx]))
    return torch.cat(out)


def _confusion_of_patch_predictions(pred: Tensor, masks: Sequence[Tensor], n_pred: int, n_classes: int,
                                    soft: bool) -> Tensor:
    """``[C, n_pred]`` confusion (rows: ground truth) of per-patch predictions ``[N, h, w, n_pred]`` (soft:
    bilinear upsampling of the scores, then argmax) or ``[N, h, w]`` (hard: nearest upsampling), each image at
    its own mask's size."""
    conf = torch.zeros(n_classes, n_pred, dtype=torch.long)
    for i, m in enumerate(masks):
        size = tuple(m.shape)
        if soft:
            up = F.interpolate(pred[i].permute(2, 0, 1)[None].float(), size=size, mode="bilinear",
                               align_corners=False)[0].argmax(0)
        else:
            up = F.interpolate(pred[i][None, None].float(), size=size, mode="nearest")[0, 0].long()
        conf += confusion_matrix(up, m, n_classes, IGNORE_INDEX, n_pred)
    return conf


def hummingbird(train_tokens: Tensor, train_masks: Sequence[Tensor], test_tokens: Tensor,
                test_masks: Sequence[Tensor], names: Sequence[str], memory_size: int = 0, k: int = HBIRD_NEIGHBOURS,
                temperature: float = HBIRD_TEMPERATURE, seed: int = 0) -> dict:
    """Hummingbird in-context retrieval of ``[N, h, w, D]`` test tokens from the train tokens and masks: mIoU
    (and the other segmentation scores) against the test masks, each at its own size."""
    n_classes = len(names)
    grid = tuple(train_tokens.shape[1:3])
    hist = torch.cat([patch_histograms(m[None], grid, n_classes) for m in train_masks])  # masks of any sizes
    keys, labels = hbird_memory(train_tokens, hist, memory_size, seed)
    n, h, w, d = test_tokens.shape
    pred = hbird_labels(test_tokens.reshape(-1, d), keys, labels, k, temperature).reshape(n, h, w, n_classes)
    conf = _confusion_of_patch_predictions(pred, test_masks, n_classes, n_classes, soft=True)
    return {**segmentation_scores(conf, names), "memory": len(keys), "neighbours": min(k, len(keys)),
            "temperature": temperature}


@torch.no_grad()
def kmeans(x: Tensor, k: int, seed: int = 0, iterations: int = 50) -> Tensor:
    """Cluster index ``[N]`` of each row of ``x`` by Lloyd's K-means from a seeded k-means++ start (squared
    Euclidean distance)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centres = x[torch.randint(len(x), (1,), generator=g)]
    d2 = torch.cdist(x, centres).square().min(1).values
    for _ in range(1, k):  # k-means++: the next centre drawn in proportion to the squared distance
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).square()[:, 0])
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def match_clusters(conf: Tensor) -> Tensor:
    """Class of each cluster from a ``[C, K]`` confusion (rows: ground truth): the Hungarian one-to-one matching
    that keeps the most pixels when ``K == C``, else each cluster to the class it overlaps most."""
    n_classes, k = conf.shape
    if k == n_classes:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(conf.numpy(), maximize=True)
        out = torch.empty(k, dtype=torch.long)
        out[torch.as_tensor(cols)] = torch.as_tensor(rows)
        return out
    return conf.argmax(0)


def overclustering(tokens: Tensor, masks: Sequence[Tensor], names: Sequence[str], ks: Sequence[int] = (0, 100, 300),
                   seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """mIoU of K-means clusters of ``[N, h, w, D]`` test patch tokens mapped to classes through their masks
    (``K = 0``: the number of classes), ``{str(K): {"miou": mean over seeds, "per_seed": [...]}}``; a ``K``
    above the number of patches is skipped."""
    n_classes = len(names)
    n, h, w, d = tokens.shape
    x = F.normalize(tokens.reshape(-1, d).float(), dim=-1)
    out = {}
    for k in ks:
        k = k or n_classes
        if k > len(x):
            continue
        per_seed = []
        for seed in seeds:
            clusters = kmeans(x, k, seed).reshape(n, h, w)
            conf = _confusion_of_patch_predictions(clusters, masks, k, n_classes, soft=False)
            to_class = match_clusters(conf)
            per_seed.append(segmentation_scores(_merge_columns(conf, to_class, n_classes), names)["miou"])
        out[str(k)] = {"miou": sum(per_seed) / len(per_seed), "per_seed": per_seed,
                       "matching": "hungarian" if k == n_classes else "many-to-one"}
    return out


def _merge_columns(conf: Tensor, to_class: Tensor, n_classes: int) -> Tensor:
    """The ``[C, C]`` confusion once every cluster column is added to its class's column."""
    return torch.zeros(n_classes, n_classes, dtype=conf.dtype).index_add_(1, to_class, conf)
