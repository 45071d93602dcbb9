"""One evaluation entry: :func:`evaluate` runs named protocols (:data:`PROTOCOLS`) on one feature source.

Every path that scores a backbone goes through here: ``pwself eval*``, ``compare``, ``tune``'s held-out kNN,
the in-training kNN and the floors. Feature protocols (kNN, linear) score the frozen features of a bank
(train) and queries (test) split, pooled by one rule (:func:`default_pooling`); model protocols (dense,
copy detection, retrieval) read their own data through the settings. Adding a protocol is one function and
one line in :data:`PROTOCOLS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from pwself.eval.source import FeatureSource, cached_features

if TYPE_CHECKING:
    from pwself.config import TrainConfig
    from pwself.eval.dense import DenseSettings

__all__ = ["EvalSettings", "EvalData", "PROTOCOLS", "FEATURE_PROTOCOLS", "evaluate", "score_features",
           "default_pooling", "run_source"]

log = logging.getLogger(__name__)
Split = tuple[Tensor, Tensor]  # (features [N, D], labels [N])


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation protocols take, as typed values (the CLI fills it from its flags).

    Attributes:
        data_kind, data_root: The dataset of kNN and linear (default: the first checkpoint's).
        pooling: Poolings of the feature protocols (``auto``: :func:`default_pooling`; ``cls``, ``mean-patch``, ...).
        in_chans, img_size: Input channels and side of a timm model (default: from the data).
        cache_dir: Feature cache ('' or ``None``: none).
        device: Where features are extracted (``auto``: a GPU when there is one).
        progress: Progress bars.
        ks, temperature: kNN's k values and vote temperature.
        epochs: Linear probe epochs.
        copydetect_path, generate_from, whiten: Copy detection's Copydays-layout folder, the image folder to
            build it from first, PCA whitening.
        imsize: Square input side of copy detection (default: the model's) and longest side of retrieval (224).
        gnd, images, crop_queries, multiscale: Retrieval's ground truth, image folder (default: jpg/ beside the
            ground truth), query cropping, multi-scale descriptors.
        dense_root: The dense probe's dataset (``pwself make-scenes`` layout).
        dense: The dense probe's settings (default: its defaults, with ``cache_dir`` and ``progress`` from here;
            the device is the model's; the raw-pixel row is :func:`pwself.eval.suite.run`'s).
    """

    data_kind: str | None = None
    data_root: str | None = None
    pooling: tuple[str, ...] = ("auto",)
    in_chans: int | None = None
    img_size: int | None = None
    cache_dir: str | None = ".pwself_cache"
    device: str = "auto"
    progress: bool = True
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    epochs: int = 30
    copydetect_path: str | None = None
    generate_from: str | None = None
    whiten: bool = True
    imsize: int | None = None
    gnd: str | None = None
    images: str | None = None
    crop_queries: bool = True
    multiscale: bool = False
    dense_root: str | None = None
    dense: DenseSettings | None = None


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


def _knn(feats: dict[str, Split], settings: EvalSettings) -> dict[int, dict[str, float]]:
    from pwself.eval.knn import knn_classify

    bank = len(feats["train"][0])
    ks = tuple(k for k in settings.ks if k <= bank)
    if not ks:
        log.warning("every k of %s is larger than the bank (%d images): k = %d", settings.ks, bank, bank)
        ks = (bank,)
    return knn_classify(*feats["train"], *feats["test"], ks=ks, temperature=settings.temperature)


def _linear(feats: dict[str, Split], settings: EvalSettings) -> dict[str, Any]:
    from pwself.eval.linear import linear_probe

    return linear_probe(*feats["train"], *feats["test"], epochs=settings.epochs)


def _copydetect(source: FeatureSource, settings: EvalSettings) -> dict[str, Any]:
    from pwself.eval.copydetect import evaluate_copydetect, generate_copydetect_set, read_copydays

    if not settings.copydetect_path:
        raise ValueError("copy detection needs a Copydays-layout folder: pass --copydetect-path DIR")
    path = settings.copydetect_path
    layout = generate_copydetect_set(settings.generate_from, path) if settings.generate_from else read_copydays(path)
    channels = source.backbone.patch_embed.proj.in_channels
    return evaluate_copydetect(source.backbone, layout, source.mean, source.std, settings.imsize or source.size,
                               channels, whiten=settings.whiten, progress=settings.progress)


def _retrieval(source: FeatureSource, settings: EvalSettings) -> dict[str, Any]:
    from pwself.eval.retrieval import evaluate_retrieval

    if not settings.gnd:
        raise ValueError("retrieval needs a ground-truth file: pass --gnd FILE")
    images = settings.images or str(Path(settings.gnd).parent / "jpg")
    return evaluate_retrieval(source.backbone, settings.gnd, images, source.mean, source.std,
                              imsize=settings.imsize or 224, crop_queries=settings.crop_queries,
                              multiscale=settings.multiscale, channels=source.backbone.patch_embed.proj.in_channels)


def _dense(source: FeatureSource, settings: EvalSettings) -> dict[str, Any]:
    from pwself.eval.dense import DenseSettings, evaluate_dense

    if not settings.dense_root:
        raise ValueError("the dense probe needs a dense dataset: pass --dense DIR (made by pwself make-scenes)")
    dense = settings.dense or DenseSettings(cache_dir=settings.cache_dir or None, progress=settings.progress)
    dense = replace(dense, device=next(source.backbone.parameters()).device, pixel_floor=False, random_floor=False)
    return evaluate_dense([source], settings.dense_root, dense)[source.name]


FEATURE_PROTOCOLS: dict[str, Callable[[dict[str, Split], EvalSettings], Any]] = {"knn": _knn, "linear": _linear}
MODEL_PROTOCOLS: dict[str, Callable[[FeatureSource, EvalSettings], Any]] = {
    "dense": _dense, "copydetect": _copydetect, "retrieval": _retrieval}
PROTOCOLS = (*FEATURE_PROTOCOLS, *MODEL_PROTOCOLS)
"""Every protocol's name: the feature protocols first, then those that read data of their own."""


def score_features(feats: dict[str, Split], protocols: Sequence[str], settings: EvalSettings) -> dict[str, Any]:
    """The feature protocols on features already extracted (``{"train": .., "test": ..}``); raw pixels use this."""
    if (feats["train"][1] < 0).any() or (feats["test"][1] < 0).any():
        raise ValueError(f"{' and '.join(protocols)} needs labels: the dataset has unlabelled images (label -1); "
                         "give a labelled one (folder sub-folders, idx, cifar) with --data-kind/--data-root")
    return {name: FEATURE_PROTOCOLS[name](feats, settings) for name in protocols}


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
        >>> settings = pwself.EvalSettings(ks=(10,), cache_dir=None, progress=False, epochs=2)
        >>> res = pwself.evaluate(run_source(backbone, cfg), pwself.EvalData.of_run(cfg), ["knn", "linear"], settings)
        >>> sorted(res), sorted(res["knn"])
        (['knn', 'linear'], [10])
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}: use {', '.join(PROTOCOLS)}")
    out: dict[str, Any] = {}
    wanted = [p for p in protocols if p in FEATURE_PROTOCOLS]
    if wanted:
        if data is None:
            raise ValueError(f"{', '.join(wanted)} need a labelled dataset: pass --data-kind and --data-root")
        out.update(score_features(features(source, data, pooling, settings), wanted, settings))
    for name in (p for p in protocols if p in MODEL_PROTOCOLS):
        out[name] = MODEL_PROTOCOLS[name](source, settings)
    return out
