"""Backbone (timm ViT), DINO projection head, the network that joins them, and the EMA teacher update."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from pwself.losses import PairRows
from pwself.sections import NON_NEGATIVE, POSITIVE, ConfigError, check_choice, check_ranges

PATCH_HEADS = ("shared", "separate", "split")  # head.patch_head (see HeadConfig)

__all__ = ["BackboneConfig", "HeadConfig", "portable_init", "make_vit", "DINOHead", "TokenOutput", "forward_tokens",
           "MaskedCells", "Selection", "HeadOutput", "DistillNet", "ema_update"]


@dataclass
class BackboneConfig:
    """A timm ViT: the plain :class:`VisionTransformer` built from the size keys, or any timm ViT family by name
    (layer scale and register tokens: ``vit_*_dinov2``, ``vit_*_reg4_dinov2``; RoPE: ``vit_*_dinov3``).

    The nominal input side is the global view size (``views.global_size``), not a key of its own; other
    sizes work (``dynamic_img_size``: position embeddings resampled, RoPE built for each grid).

    Attributes:
        name: A timm ViT architecture (e.g. ``vit_small_patch16_224``, ``vit_small_patch14_reg4_dinov2``,
            ``vit_small_patch16_dinov3``): the model timm builds for it, whose sizes then fill patch_size,
            embed_dim, depth, num_heads and mlp_ratio; empty: a plain ViT of those keys.
        model_args: timm keyword arguments for ``name`` (e.g. ``{embed_dim: 96, depth: 2, num_heads: 2}`` to
            shrink it), as in an exported ``config.json``; only with ``name``.
        init: Local weights file or folder to start from (pwself, timm, DINO, dinov2 or dinov3); empty: random
            init. Head weights in the file (DINO, dinov2, pwself) start the heads.
        patch_size: Patch side ``p``.
        in_chans: Image channels (1 for grayscale data, 3 for RGB); 0: from the data (1 for idx and synthetic,
            3 for cifar, a folder's images: 3 when any is colour), said in one line and written into config.yaml.
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the block MLP relative to ``embed_dim``.
        drop_path_rate: Stochastic depth rate.
    """

    name: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    init: str = ""
    patch_size: int = 4
    in_chans: int = 0
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def validate(self) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for sizes no ViT has."""
        check_ranges(self, "backbone", {**{k: POSITIVE for k in ("patch_size", "num_heads", "embed_dim", "depth",
                                                                  "mlp_ratio")},
                                        "in_chans": NON_NEGATIVE,
                                        "drop_path_rate": (lambda x: 0 <= x < 1, "in [0, 1)")})
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"backbone.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.model_args and not self.name:
            raise ConfigError("backbone.model_args needs backbone.name (the timm architecture they are passed to): "
                              "set backbone.name, or give the sizes as backbone.embed_dim, depth, num_heads")
        fixed = sorted(set(self.model_args) & set(_BUILD_KEYS))
        if fixed:
            raise ConfigError(f"backbone.model_args sets {', '.join(fixed)}, which pwself sets itself: use "
                              "views.global_size for img_size, backbone.in_chans for in_chans, backbone."
                              "drop_path_rate for drop_path_rate")


@dataclass
class HeadConfig:
    """DINO projection head: MLP -> L2-normalize -> weight-normalized linear layer to ``out_dim``.

    Attributes:
        out_dim: Output dimension ``K`` (prototypes) of the last layer.
        hidden_dim: Width of the MLP's hidden layers.
        bottleneck_dim: Width of the MLP's output, L2-normalized before the last layer.
        n_layers: Linear layers of the MLP.
        norm_last_layer: Freeze the norm of the weight-normalized last layer at 1 (DINO's default).
        patch_head: Head of the patch tokens: `shared` (the CLS head, the paper's), `separate` (a head of
            its own, as DINOv2) or `split` (the CLS head's MLP with a last layer of its own, as iBOT).
        patch_out_dim: Output dimension of a `separate` or `split` patch head (0: `out_dim`).
    """

    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    n_layers: int = 3
    norm_last_layer: bool = True
    patch_head: str = "shared"
    patch_out_dim: int = 0

    def validate(self) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for a head that cannot be built."""
        check_ranges(self, "head", {**{k: POSITIVE for k in ("out_dim", "hidden_dim", "bottleneck_dim", "n_layers")},
                                    "patch_out_dim": NON_NEGATIVE})
        check_choice("head.patch_head", self.patch_head, PATCH_HEADS)
        if self.patch_head == "shared" and self.patch_out_dim not in (0, self.out_dim):
            raise ConfigError(f"head.patch_out_dim={self.patch_out_dim} needs a patch head of its own: set "
                              "head.patch_head=separate or split")


# Keyword arguments pwself gives timm for every named backbone (from its own keys), never from model_args.
_BUILD_KEYS = ("img_size", "in_chans", "num_classes", "dynamic_img_size", "drop_path_rate", "pretrained")


def _timm_vit_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva

    return (VisionTransformer, Eva)


def named_architecture(name: str, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The size keys of the timm ViT built for ``name`` with ``model_args``, read from the model built on the
    meta device (no weights, no download). ``ValueError`` for names that are not a timm ViT with a class token
    (the plain ``VisionTransformer``, with or without layer scale and registers, or ``Eva`` with RoPE)."""
    import timm

    if name not in timm.list_models():
        raise ValueError(f"backbone.name={name!r} is not a timm model: use e.g. vit_small_patch16_224, "
                         "vit_small_patch14_reg4_dinov2 or vit_small_patch16_dinov3 (timm.list_models('vit_*') "
                         "lists them)")
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0, **(model_args or {}))
    except TypeError as e:
        raise ValueError(f"backbone.model_args={model_args} does not fit {name} ({e}): give timm keyword "
                         "arguments of that architecture, e.g. {embed_dim: 96, depth: 2, num_heads: 2}") from None
    if not isinstance(m, _timm_vit_classes()) or getattr(m, "cls_token", None) is None:
        raise ValueError(f"backbone.name={name!r} is not a timm ViT with a class token ({type(m).__name__}): use "
                         "e.g. vit_small_patch16_224, vit_small_patch14_reg4_dinov2 or vit_small_patch16_dinov3")
    attn = m.blocks[0].attn
    return {"patch_size": m.patch_embed.patch_size[0], "embed_dim": m.embed_dim, "depth": len(m.blocks),
            "num_heads": attn.num_heads, "mlp_ratio": m.blocks[0].mlp.fc1.out_features / m.embed_dim}


def describe_backbone(model: nn.Module) -> str:
    """What a backbone is beyond its sizes, in a few words: ``4 registers, layer scale, RoPE``."""
    parts = []
    reg = getattr(model, "reg_token", None)
    if reg is not None:
        parts.append(f"{reg.shape[1]} register{'s' if reg.shape[1] > 1 else ''}")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    if names & {"gamma", "gamma_1"}:
        parts.append("layer scale")
    if getattr(model, "rope", None) is not None:
        parts.append("RoPE")
    return ", ".join(parts)


@contextmanager
def portable_init() -> Iterator[None]:
    """Modules built inside draw their initial weights in float64 (cast to float32 by the caller): float32
    ``erfinv`` and Box-Muller (``trunc_normal_``, ``normal_``) round differently on other CPUs, so one seed
    would start from other weights there."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class _ViT(VisionTransformer):
    """timm's ViT (plain, layer scale, registers), except that a float64 position embedding is resampled in
    float64 for other view sizes: timm resamples in float32, whose bicubic kernel rounds differently on other
    CPUs, and ``precision=fp64`` runs must give the same numbers on every machine. Its weights and outputs are
    timm's otherwise (the order of adding and joining the prefix tokens follows ``_pos_embed``)."""

    def _pos_embed(self, x: Tensor) -> Tensor:
        if self.pos_embed is None or self.pos_embed.dtype != torch.float64:
            return super()._pos_embed(x)
        b, h, w, c = x.shape  # dynamic_img_size: NHWC patch tokens
        n_pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        gh, gw = self.patch_embed.grid_size
        grid = self.pos_embed[:, n_pos_prefix:].reshape(1, gh, gw, c).permute(0, 3, 1, 2)
        if (h, w) != (gh, gw):  # timm's resample_abs_pos_embed defaults
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        pos = torch.cat([self.pos_embed[:, :n_pos_prefix], grid.flatten(2).transpose(1, 2)], 1)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = x.reshape(b, -1, c)
        x = torch.cat([*prefix, x + pos], 1) if self.no_embed_class else torch.cat([*prefix, x], 1) + pos
        return self.pos_drop(x)


def make_vit(cfg: BackboneConfig, img_size: int) -> VisionTransformer:
    """Create the timm ViT backbone for ``img_size`` inputs (no classifier; ``dynamic_img_size`` for multi-crop):
    the model timm builds for ``cfg.name`` and ``cfg.model_args``, or a plain ViT of the size keys."""
    if img_size % cfg.patch_size:
        raise ValueError(
            f"image size {img_size} is not a multiple of the patch size {cfg.patch_size}: "
            f"use a global size divisible by {cfg.patch_size}"
        )
    if cfg.name:
        import timm

        with portable_init():
            vit = timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=img_size,
                                    in_chans=cfg.in_chans, dynamic_img_size=True, drop_path_rate=cfg.drop_path_rate,
                                    **cfg.model_args)
        if type(vit) is VisionTransformer:
            vit.__class__ = _ViT  # the same module, with the float64 resampling above
        return vit.float()
    with portable_init():
        vit = _ViT(
            img_size=img_size,
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
    return vit.float()


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021), applied to any ``[..., D]`` tokens.

    Args:
        in_dim: Backbone token width.
        cfg: Head sizes.

    Example:
        >>> import torch, pwself
        >>> from pwself.models import HeadConfig
        >>> head = pwself.DINOHead(128, HeadConfig(out_dim=256))
        >>> head(torch.randn(4, 36, 128)).shape
        torch.Size([4, 36, 256])
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
        self.last_layer = _last_layer(cfg.bottleneck_dim, cfg.out_dim, cfg.norm_last_layer)

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


def _last_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    layer.parametrizations.weight.original0.data.fill_(1.0)
    if norm_last_layer:
        layer.parametrizations.weight.original0.requires_grad = False
    return layer


class SplitPatchHead(nn.Module):
    """iBOT's split: the patch tokens go through the CLS head's MLP and a last layer of their own."""

    def __init__(self, cls_head: DINOHead, cfg: HeadConfig) -> None:
        super().__init__()
        self._cls_head = [cls_head]  # a plain list: the MLP is the CLS head's, not registered twice
        self.last_layer = _last_layer(cfg.bottleneck_dim, cfg.patch_out_dim or cfg.out_dim, cfg.norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self._cls_head[0].mlp(x), dim=-1, p=2))


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


def forward_tokens(backbone: VisionTransformer, x: Tensor, masks: Tensor | None = None,
                   mask_token: Tensor | None = None) -> TokenOutput:
    """Run the backbone and split its normalized tokens into CLS and patch tokens.

    With ``masks`` (``[N, T]`` bool), the patch embedding of every masked cell is replaced by ``mask_token``
    (``[1, D]``) before the position embedding is added (iBOT, dinov2): the backbone itself stays timm's.
    """
    if masks is None:
        tokens = backbone.forward_features(x)
    else:
        def put_mask_token(module: nn.Module, inputs: Any, embedded: Tensor) -> Tensor:  # [N, H, W, D]
            cells = masks.view(*embedded.shape[:-1], 1)
            return torch.where(cells, mask_token.to(embedded.dtype), embedded)

        hook = backbone.patch_embed.register_forward_hook(put_mask_token)
        try:
            tokens = backbone.forward_features(x)
        finally:
            hook.remove()
    p = backbone.patch_embed.patch_size
    grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
    n_prefix = backbone.num_prefix_tokens
    return TokenOutput(tokens[:, 0], tokens[:, n_prefix:], grid)


@dataclass(frozen=True)
class MaskedCells:
    """Masked patch distillation's part of a step: the student's global crops with masked cells, and the rows
    of those cells' outputs (iBOT: each masked cell predicts the teacher's token of the same cell, unmasked).

    Attributes:
        masks: ``[G * B, T]`` bool masks of the student's global crops (view-major), applied in the forward.
        student_row: ``[M]`` row of each masked cell in the student patch outputs.
        teacher_row: ``[M]`` row of the same cell in the teacher patch outputs.
        weight: ``[M]`` weight of each cell's cross-entropy: 1 / (masked cells of its crop) / (G * B).
    """

    masks: Tensor
    student_row: Tensor
    teacher_row: Tensor
    weight: Tensor


@dataclass(frozen=True)
class Selection:
    """The patch tokens a step's loss uses and how they pair.

    Attributes:
        student_keys: ``[Us]`` distinct keys of the student patch tokens the head runs on.
        teacher_keys: ``[Ut]`` distinct keys of the teacher patch tokens the head runs on (``None`` when the
            targets are CLS outputs).
        rows: The pairs as rows of the student patch outputs and the teacher targets (``None``: no pairs
            across views, only masked cells).
        masked: The masked cells, when the student's global crops are masked.
    """

    student_keys: Tensor
    teacher_keys: Tensor | None
    rows: PairRows | None
    masked: MaskedCells | None = None


@dataclass(frozen=True)
class HeadOutput:
    """What a :class:`DistillNet` gives the objective for one batch of views.

    Attributes:
        cls: ``[N, K]`` head logits of the CLS tokens, view-major.
        cls_tokens: ``[N, D]`` backbone CLS tokens (before the head).
        patch: ``[U, K]`` head logits of the selected patch tokens, or their ``[U, D]`` tokens when ``head``
            is set; ``None`` when no patch token was selected.
        selection: The token selection the patches were gathered by (objective-defined).
        head: Set when ``patch`` holds tokens: the head the loss applies under activation checkpointing.
        global_patches: ``[G * B, T, D]`` backbone patch tokens of the global crops (Gram anchoring reads them).
    """

    cls: Tensor
    cls_tokens: Tensor
    patch: Tensor | None = None
    selection: Selection | None = None
    head: nn.Module | None = None
    global_patches: Tensor | None = None


Select = Callable[[Sequence[TokenOutput]], "Selection | None"]
"""A function of the backbone tokens that makes the token selection (matching by content)."""


class DistillNet(nn.Module):
    """Backbone + DINO head. The head runs only on the tokens the loss uses: the CLS tokens and the selected
    patch tokens, each once (gathered before the head, as dinov2 does for iBOT).

    Patch tokens are addressed by keys: indices into the patch tokens of all crops flattened crop by crop
    (view-major, then sample, then token). A :class:`Selection` holds the ``[U]`` distinct keys of the
    student's patch tokens in the loss.

    Example:
        >>> import torch, pwself
        >>> from pwself.models import BackboneConfig, HeadConfig
        >>> net = pwself.DistillNet(BackboneConfig(in_chans=1, patch_size=4, embed_dim=32, depth=1, num_heads=2),
        ...                         HeadConfig(out_dim=64), img_size=16)
        >>> out = net([torch.rand(6, 1, 16, 16), torch.rand(12, 1, 8, 8)])  # globals, then locals
        >>> out.cls.shape, out.cls_tokens.shape, out.patch is None
        (torch.Size([18, 64]), torch.Size([18, 32]), True)
    """

    def __init__(self, backbone: BackboneConfig, head: HeadConfig, img_size: int, mask_token: bool = False) -> None:
        super().__init__()
        self.backbone = make_vit(backbone, img_size)
        # iBOT's learnable mask token, outside the backbone so that the exported backbone is a plain timm ViT.
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim)) if mask_token else None
        with portable_init():
            self.head = DINOHead(backbone.embed_dim, head)
            self.patch_head: nn.Module | None = None  # None: the CLS head serves the patch tokens too
            if head.patch_head == "separate":
                self.patch_head = DINOHead(backbone.embed_dim,
                                           replace(head, out_dim=head.patch_out_dim or head.out_dim))
            elif head.patch_head == "split":
                self.patch_head = SplitPatchHead(self.head, head)
        self.float()

    def encode(self, crops: Sequence[Tensor], masks: Tensor | None = None) -> list[TokenOutput]:
        """Backbone tokens of each non-empty batch of crops (one backbone call per crop size); ``masks``
        (``[N, T]`` bool) mask the first batch, the global crops, with the mask token."""
        if masks is not None and self.mask_token is None:
            raise ValueError("masked crops need a mask token: build the DistillNet with mask_token=True")
        return [forward_tokens(self.backbone, x, masks if i == 0 else None, self.mask_token)
                for i, x in enumerate(crops) if x.shape[0]]

    def project(self, tokens: Sequence[TokenOutput], keys: Tensor | None = None,
                recompute_head: bool = False) -> HeadOutput:
        """The head on every CLS token and on the patch tokens ``keys`` (one head call)."""
        cls_tokens = torch.cat([t.cls for t in tokens])
        if keys is None:
            return HeadOutput(self.head(cls_tokens), cls_tokens)
        patches = torch.cat([t.patches.flatten(0, 1) for t in tokens])[keys]
        patch_head = self.patch_head or self.head
        if recompute_head:
            return HeadOutput(self.head(cls_tokens), cls_tokens, patches, head=patch_head)
        if self.patch_head is not None:
            return HeadOutput(self.head(cls_tokens), cls_tokens, self.patch_head(patches))
        out = self.head(torch.cat([cls_tokens, patches]))
        n = cls_tokens.shape[0]
        return HeadOutput(out[:n], cls_tokens, out[n:])

    def forward(self, crops: Sequence[Tensor], select: Selection | Select | None = None,
                recompute_head: bool = False) -> HeadOutput:
        """Backbone, then head. ``select`` is a selection or a function of the tokens that returns one; a
        selection with masked cells masks the global crops."""
        masked = select.masked if isinstance(select, Selection) else None
        tokens = self.encode(crops, masked.masks if masked is not None else None)
        selection = select(tokens) if callable(select) else select
        out = self.project(tokens, selection.student_keys if selection is not None else None, recompute_head)
        return replace(out, selection=selection, global_patches=tokens[0].patches)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
