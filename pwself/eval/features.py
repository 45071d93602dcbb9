"""Frozen-feature extraction from a backbone, batched, with progress."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pwself.data import iterate_batches
from pwself.eval.metrics import gem
from pwself.models import forward_tokens
from pwself.runtime import gather_rows, shard_indices

__all__ = ["POOLINGS", "extract_features", "normalize_images", "pool_features"]

POOLINGS = ("cls", "mean-patch", "cls+mean", "last4", "cls+gem", "bag")


def pool_features(backbone: nn.Module, x: Tensor, pooling: str) -> Tensor:
    """One image descriptor per input from a timm ViT's normalized tokens.

    * ``cls``: CLS token of the last block.
    * ``mean-patch``: mean of the last block's patch tokens.
    * ``cls+mean``: both concatenated (BagSSL's aggregation; dinov2's linear input with avgpool).
    * ``last4``: CLS tokens of the last 4 blocks concatenated, each after the final norm (dino/dinov2).
    * ``cls+gem``: CLS concatenated with GeM (p = 4) over patch tokens (dino's copy-detection descriptor).
    * ``bag``: BagSSL's aggregation, the mean of the CLS tokens of the 2x2 grid of half-size tiles
      (each tile at its native resolution).
    """
    if pooling == "bag":
        h, w = x.shape[-2:]
        p = backbone.patch_embed.patch_size[0]
        if h % (2 * p) or w % (2 * p):
            raise ValueError(f"bag pooling cuts {h}x{w} inputs into 2x2 tiles: the side must be a multiple of {2 * p}")
        tiles = [x[..., i * h // 2 : (i + 1) * h // 2, j * w // 2 : (j + 1) * w // 2]
                 for i in range(2) for j in range(2)]
        return torch.stack([forward_tokens(backbone, tile).cls for tile in tiles]).mean(0)
    if pooling == "last4":
        inter = backbone.forward_intermediates(x, indices=4, norm=True, output_fmt="NLC",
                                               return_prefix_tokens=True, intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in inter], 1)
    tok = forward_tokens(backbone, x)
    if pooling == "cls":
        return tok.cls
    if pooling == "mean-patch":
        return tok.patches.mean(1)
    if pooling == "cls+mean":
        return torch.cat([tok.cls, tok.patches.mean(1)], 1)
    if pooling == "cls+gem":
        return torch.cat([tok.cls, gem(tok.patches, p=4.0)], 1)
    raise ValueError(f"pooling {pooling!r}: use one of {', '.join(POOLINGS)}")


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
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """L2-normalized features and labels of a whole dataset.

    Args:
        backbone: timm ViT (``forward_features``).
        dataset: Yields ``(uint8 [C, H, W], label)``.
        mean: Normalization mean.
        std: Normalization std.
        size: Input side (images are resized when they differ); ``None`` keeps them.
        pooling: One of :data:`POOLINGS` (see :func:`pool_features`).
        batch_size: Images per forward.
        num_workers: Decoding workers for folder datasets.
        device: Where the backbone runs.
        progress: Show a progress bar.
        desc: Progress bar label.
        normalize: L2-normalize each feature (off for descriptors that are whitened first).

    Returns:
        ``([N, D'] float32 features (unit L2 norm if ``normalize``), [N] long labels)``.
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
        f = pool_features(backbone, x, pooling)
        feats.append((F.normalize(f.float(), dim=1) if normalize else f.float()).cpu())
        labels.append(torch.as_tensor(y).long())
    backbone.train(was_training)
    return gather_rows(torch.cat(feats), mine, n), gather_rows(torch.cat(labels), mine, n)
