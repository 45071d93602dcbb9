"""Frozen-feature extraction from a backbone, batched, with progress."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pwself.data import iterate_batches
from pwself.distributed import gather_rows, shard_indices
from pwself.models import forward_tokens

__all__ = ["extract_features", "normalize_images"]


def normalize_images(images: Tensor, mean: list[float], std: list[float], size: int | None = None) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> float normalized images, resized to ``size`` when given."""
    x = images.float() / 255
    if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    mean: list[float],
    std: list[float],
    size: int | None = None,
    pooling: str = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """L2-normalized features and labels of a whole dataset.

    Args:
        backbone: timm ViT (``forward_features``).
        dataset: Yields ``(uint8 [C, H, W], label)``.
        mean: Normalization mean.
        std: Normalization std.
        size: Input side (images are resized when they differ); ``None`` keeps them.
        pooling: ``cls``, ``mean-patch`` or ``cls+mean`` (concatenation, BagSSL's aggregation).
        batch_size: Images per forward.
        num_workers: Decoding workers for folder datasets.
        device: Where the backbone runs.
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        ``([N, D'] float32 features with unit L2 norm, [N] long labels)``.
    """
    was_training = backbone.training
    backbone.eval()
    n = len(dataset)
    mine = shard_indices(n)  # under torchrun each rank extracts its share, then all rows are gathered
    batches = list(mine.split(batch_size))
    feats, labels = [], []
    for images, y in tqdm(iterate_batches(dataset, batches, num_workers), total=len(batches), desc=desc,
                          disable=not progress, leave=False):
        x = normalize_images(images.to(device), mean, std, size)
        tok = forward_tokens(backbone, x)
        if pooling == "cls":
            f = tok.cls
        elif pooling == "mean-patch":
            f = tok.patches.mean(1)
        elif pooling == "cls+mean":
            f = torch.cat([tok.cls, tok.patches.mean(1)], 1)
        else:
            raise ValueError(f"pooling {pooling!r}: use cls, mean-patch or cls+mean")
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y).long())
    backbone.train(was_training)
    return gather_rows(torch.cat(feats), mine, n), gather_rows(torch.cat(labels), mine, n)
