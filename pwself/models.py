"""Backbone (timm ViT), DINO projection head, and the EMA teacher update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["BackboneConfig", "HeadConfig", "make_vit", "DINOHead", "TokenOutput", "forward_tokens", "ema_update"]


@dataclass
class BackboneConfig:
    """A timm :class:`VisionTransformer`.

    Attributes:
        img_size: Nominal input side (the global view size); other sizes work (``dynamic_img_size``).
        patch_size: Patch side ``p``.
        in_chans: Image channels (1 for grayscale data, 3 for RGB).
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the block MLP relative to ``embed_dim``.
        drop_path_rate: Stochastic depth rate.
    """

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0


@dataclass
class HeadConfig:
    """DINO projection head: MLP -> L2-normalize -> weight-normalized linear layer to ``out_dim``."""

    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    n_layers: int = 3
    norm_last_layer: bool = True


def make_vit(cfg: BackboneConfig) -> VisionTransformer:
    """Create the timm ViT backbone (no classifier; ``dynamic_img_size`` for multi-crop)."""
    if cfg.img_size % cfg.patch_size:
        raise ValueError(
            f"image size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}: "
            f"use a global size divisible by {cfg.patch_size}"
        )
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=cfg.drop_path_rate,
        num_classes=0,
        dynamic_img_size=True,
    )


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021), applied to any ``[..., D]`` tokens.

    Args:
        in_dim: Backbone token width.
        cfg: Head sizes.
    """

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.n_layers - 1) + [cfg.bottleneck_dim]
        for i in range(cfg.n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if cfg.norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D]`` tokens -> ``[..., out_dim]`` logits."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


@dataclass(frozen=True)
class TokenOutput:
    """Normalized backbone tokens of a batch of views (dinov2's ``x_norm_*`` fields).

    Attributes:
        cls: ``[N, D]`` CLS token after the final norm.
        patches: ``[N, T, D]`` patch tokens after the final norm, row-major over the ``grid``.
        grid: ``(rows, cols)`` of the patch grid.
    """

    cls: Tensor
    patches: Tensor
    grid: tuple[int, int]


def forward_tokens(backbone: VisionTransformer, x: Tensor) -> TokenOutput:
    """Run the backbone and split its normalized tokens into CLS and patch tokens."""
    tokens = backbone.forward_features(x)
    p = backbone.patch_embed.patch_size
    grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
    n_prefix = backbone.num_prefix_tokens
    return TokenOutput(tokens[:, 0], tokens[:, n_prefix:], grid)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
