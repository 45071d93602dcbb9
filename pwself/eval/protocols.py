"""One evaluation entry: :func:`evaluate` runs named protocols (:data:`PROTOCOLS`) on one feature source.

Every path that scores a backbone goes through here: ``pwself eval*``, ``compare``, ``tune``'s held-out kNN,
the in-training kNN and the floors. Feature protocols (kNN, linear) score the frozen features of a bank
(train) and queries (test) split, pooled by one rule (:func:`default_pooling`); model protocols (dense,
copy detection, retrieval) read their own data through their settings. A protocol is one
:class:`~pwself.eval.registry.Protocol` in its own module and one entry in :data:`PROTOCOLS`
(:func:`register_protocol` from outside the package).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from pwself.eval import copydetect, dense, knn, linear, retrieval
from pwself.eval.registry import Protocol
from pwself.eval.source import FeatureSource, cached_features

if TYPE_CHECKING:
    from pwself.config import TrainConfig

__all__ = ["EvalSettings", "EvalData", "PROTOCOLS", "Protocol", "register_protocol", "feature_protocols",
           "evaluate", "score_features", "default_pooling", "run_source"]

log = logging.getLogger(__name__)
Split = tuple[Tensor, Tensor]  # (features [N, D], labels [N])


@dataclass(frozen=True)
class EvalSettings:
    """What every evaluation protocol shares, and each protocol's own settings (the CLI fills it from its flags).

    Attributes:
        data_kind, data_root: The dataset of the feature protocols (default: the first checkpoint's).
        pooling: Poolings of the feature protocols (``auto``: :func:`default_pooling`; ``cls``, ``mean-patch``, ...).
        in_chans, img_size: Input channels and side of a timm model (default: from the data).
        cache_dir: Feature cache ('' or ``None``: none).
        device: Where features are extracted (``auto``: a GPU when there is one).
        progress: Progress bars.
        options: Each protocol's own settings by name (its ``Protocol.Settings``; a protocol not named here runs
            with its defaults), e.g. ``{"knn": KnnSettings(ks=(10,))}``.
    """

    data_kind: str | None = None
    data_root: str | None = None
    pooling: tuple[str, ...] = ("auto",)
    in_chans: int | None = None
    img_size: int | None = None
    cache_dir: str | None = ".pwself_cache"
    device: str = "auto"
    progress: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def of(self, protocol: str) -> Any:
        """``protocol``'s settings: those given in :attr:`options`, else its defaults."""
        given = self.options.get(protocol)
        return given if given is not None else PROTOCOLS[protocol].Settings()


@dataclass(frozen=True)
class EvalData:
    """The labelled images of the feature protocols: a bank (``train``) and queries (``test``).

    Attributes:
        train, test: The two splits.
        ident: What identifies the images (kind, root, seed, ...): part of the feature cache key.
        num_workers: Decoding workers.
    """

    train: Dataset
    test: Dataset
    ident: dict[str, Any]
    num_workers: int = 0

    @classmethod
    def of_run(cls, cfg: TrainConfig) -> EvalData:
        """A run's dataset: its train split as the bank, its held-out split as the queries."""
        from pwself.data import open_dataset

        train, test = (open_dataset(cfg.data, split, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)
                       for split in ("train", "test"))
        return cls(train, test, {"kind": cfg.data.kind, "root": cfg.data.root, "seed": cfg.seed},
                   cfg.data.num_workers)

    @classmethod
    def heldout(cls, cfg: TrainConfig, fraction: float = 0.1) -> EvalData:
        """A seeded ``fraction`` of a run's train split as queries, the rest as the bank: choices made on it
        never read the test split (the same split for every trial of a tuning)."""
        from pwself.data import open_dataset

        train = open_dataset(cfg.data, "train", cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345)).tolist()
        n_val = max(1, round(fraction * len(train)))
        return cls(Subset(train, perm[n_val:]), Subset(train, perm[:n_val]),
                   {"kind": cfg.data.kind, "root": cfg.data.root, "seed": cfg.seed, "heldout": fraction},
                   cfg.data.num_workers)


def default_pooling(source: FeatureSource) -> str:
    """The one pooling rule: a pwself model is pooled as its objective says (BagSSL: the bag of tiles; else CLS),
    any other model by its CLS token."""
    from pwself.objectives import objective_class

    objective = (source.config.get("loss") or {}).get("objective")
    return objective_class(objective).pooling if objective else "cls"


def run_source(backbone: nn.Module, cfg: TrainConfig, name: str = "run") -> FeatureSource:
    """A live backbone of a run (during training, a tuning trial) as a feature source, fed as the run is."""
    from pwself.config import config_to_dict

    return FeatureSource(name, backbone, list(cfg.data.mean), list(cfg.data.std), cfg.views.global_size,
                         key=f"live:{id(backbone)}", config=config_to_dict(cfg))


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (knn.PROTOCOL, linear.PROTOCOL, dense.PROTOCOL,
                                                      copydetect.PROTOCOL, retrieval.PROTOCOL)}
"""Every protocol by name: those of labelled features first, then those that read data of their own."""


def register_protocol(protocol: Protocol) -> None:
    """Add a protocol (a :class:`~pwself.eval.registry.Protocol` defined outside the package): what the line in
    :data:`PROTOCOLS` does. The CLI, ``compare --protocols`` and the reports see it from then on."""
    PROTOCOLS[protocol.name] = protocol


def feature_protocols(names: Sequence[str]) -> list[str]:
    """The names among ``names`` that score the features of a labelled dataset."""
    return [n for n in names if PROTOCOLS[n].features]


def score_features(feats: dict[str, Split], protocols: Sequence[str], settings: EvalSettings) -> dict[str, Any]:
    """The feature protocols on features already extracted (``{"train": .., "test": ..}``); raw pixels use this."""
    if (feats["train"][1] < 0).any() or (feats["test"][1] < 0).any():
        raise ValueError(f"{' and '.join(protocols)} needs labels: the dataset has unlabelled images (label -1); "
                         "give a labelled one (folder sub-folders, idx, cifar) with --data-kind/--data-root")
    return {name: PROTOCOLS[name].run(feats, settings.of(name), settings) for name in protocols}


def features(source: FeatureSource, data: EvalData, pooling: str, settings: EvalSettings) -> dict[str, Split]:
    """Both splits' features (cached in ``settings.cache_dir``), pooled as asked (``auto``: the source's rule)."""
    pooling = default_pooling(source) if pooling == "auto" else pooling
    device = next(source.backbone.parameters()).device
    return {split: cached_features(source, ds, {**data.ident, "split": split}, pooling=pooling,
                                   cache_dir=settings.cache_dir or None, progress=settings.progress, device=device,
                                   num_workers=data.num_workers, desc=f"features {split}")
            for split, ds in (("train", data.train), ("test", data.test))}


def evaluate(source: FeatureSource, data: EvalData | None, protocols: Sequence[str],
             settings: EvalSettings = EvalSettings(), pooling: str = "auto") -> dict[str, Any]:
    """Run ``protocols`` (names in :data:`PROTOCOLS`) on one source; returns ``{protocol: result}``.

    Args:
        source: The model.
        data: Bank and queries of the feature protocols (``None`` when only model protocols run).
        protocols: Protocol names.
        settings: Every protocol's settings.
        pooling: Pooling of the feature protocols (``auto``: :func:`default_pooling`).

    Example:
        kNN and the linear probe of a run's live backbone on its own data (``run_source`` wraps a module;
        :func:`pwself.eval.source.open_source` opens a run folder, checkpoint or timm name):

        >>> import torch, pwself
        >>> from pwself.eval.protocols import run_source
        >>> cfg = pwself.load_config(None, ["data.kind=synthetic", "data.synthetic_size=64",
        ...                                 "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2"])
        >>> cfg.data.mean, cfg.data.std = [0.5], [0.25]
        >>> backbone = pwself.DistillNet(cfg.backbone, cfg.head, 28).backbone.eval()
        >>> from pwself.eval.knn import KnnSettings
        >>> from pwself.eval.linear import LinearSettings
        >>> settings = pwself.EvalSettings(cache_dir=None, progress=False,
        ...                                options={"knn": KnnSettings(ks=(10,)), "linear": LinearSettings(epochs=2)})
        >>> res = pwself.evaluate(run_source(backbone, cfg), pwself.EvalData.of_run(cfg), ["knn", "linear"], settings)
        >>> sorted(res), sorted(res["knn"])
        (['knn', 'linear'], [10])
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}: use {', '.join(PROTOCOLS)}")
    out: dict[str, Any] = {}
    wanted = feature_protocols(protocols)
    if wanted:
        if data is None:
            raise ValueError(f"{', '.join(wanted)} need a labelled dataset: pass --data-kind and --data-root")
        for name in wanted:
            if PROTOCOLS[name].check is not None:
                PROTOCOLS[name].check(settings.of(name), data)
        out.update(score_features(features(source, data, pooling, settings), wanted, settings))
    for name in (p for p in protocols if not PROTOCOLS[p].features):
        out[name] = PROTOCOLS[name].run(source, settings.of(name), settings)
    return out
