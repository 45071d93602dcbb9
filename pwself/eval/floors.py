"""The floors every result is read against: the same protocol on raw pixels and on the backbone at the random
init a run starts from (kNN, linear probe, dense probe). Cached in a JSON file each; used by training (the
floors after pretraining), ``compare`` and ``viz-curves``."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from pwself.config import TrainConfig
from pwself.data import open_dataset
from pwself.eval.knn import KnnSettings
from pwself.eval.protocols import EvalData, EvalSettings, evaluate, features, score_features
from pwself.run.folder import RunFolder

__all__ = ["pixel_floor", "random_init_floor", "start_floor", "pixel_dense_floor", "open_split", "MAX_PIXEL_DIM",
           "run_floors"]

MAX_PIXEL_DIM = 16384  # above this (e.g. 3 x 74 x 74) a raw-pixel kNN is too slow to be a side result


def open_split(cfg: TrainConfig, split: str) -> Dataset:
    """A split of the run's dataset, opened as training opens it."""

    return open_dataset(cfg.data, split, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)


def pixel_floor(cfg: TrainConfig, cache: Path, linear: bool = False) -> dict[str, float] | None:
    """kNN (k = 10, 20) of raw, L2-normalized pixels with the same bank and queries as the runs, and (with
    ``linear``) the linear probe on them: the floor that learned features must beat. ``None`` for unlabelled
    data or images above :data:`MAX_PIXEL_DIM`."""
    import torch
    import torch.nn.functional as F

    from pwself.data import iterate_batches

    if cache.exists():
        floor = json.loads(cache.read_text())
        if not linear or "linear" in floor:
            return floor
    train = open_split(cfg, "train")
    image, label = train[0]
    if image.numel() > MAX_PIXEL_DIM or int(label) < 0:  # too large for a side result, or unlabelled
        return None
    data = {}
    for split, ds in (("train", train), ("test", open_split(cfg, "test"))):
        images, labels = zip(*iterate_batches(ds, list(torch.arange(len(ds)).split(1024)), cfg.data.num_workers))
        data[split] = (F.normalize(torch.cat(images).flatten(1).float(), dim=1), torch.cat(labels))
    floor = _scores(data, linear)
    if floor is not None:
        cache.write_text(json.dumps(floor))
    return floor


def _scores(feats: dict, linear: bool) -> dict[str, float] | None:
    """kNN (k = 10, 20) and (with ``linear``) the linear probe of ``{"train"|"test": (features, labels)}``;
    ``None`` for unlabelled data."""
    if (feats["train"][1] < 0).any() or (feats["test"][1] < 0).any():
        return None
    res = score_features(feats, ["knn", "linear"] if linear else ["knn"],
                         EvalSettings(options={"knn": KnnSettings(ks=(10, 20))}))
    floor = {"knn10": res["knn"][10]["top1"], "knn20": res["knn"][20]["top1"]}
    if linear:
        floor["linear"] = res["linear"]["top1"]
    return floor


def _random_init_source(cfg: TrainConfig, splits: dict):  # noqa: ANN202 - a FeatureSource
    """The configured backbone at the init a run with ``cfg.seed`` starts from, as a feature source."""
    from pwself.data import channel_stats, take_subset
    from pwself.eval.source import random_init_source
    from pwself.runtime import resolve_device

    mean, std = cfg.data.mean, cfg.data.std
    if not mean:  # as train() computes them: over the training subset
        train_set = splits["train"]
        mean, std = channel_stats(take_subset(train_set, cfg.data.subset) if cfg.data.subset else train_set)
    return random_init_source(cfg, mean, std, resolve_device(cfg.device))


DENSE_FLOORS = ("linear", "hbird")  # the dense protocols a comparison's floors carry (overclustering: eval-dense)


def comparison_settings(dense: str | None, cache_dir: str | None = None, progress: bool = False) -> EvalSettings:
    """The evaluation settings of a run's scores and its floors, so that they are measured alike: the dense
    protocols of :data:`DENSE_FLOORS` on ``dense`` (a dense dataset), features cached in ``cache_dir``."""
    from pwself.eval.dense import DenseSettings

    return EvalSettings(cache_dir=cache_dir, progress=progress, options={"dense": DenseSettings(
        cache_dir=cache_dir, progress=progress, protocols=DENSE_FLOORS, root=dense)})


def _model_floor(cfg: TrainConfig, cache: Path, source, linear: bool,  # noqa: ANN001 - a FeatureSource maker
                 dense: str | None, feature_cache: str | None) -> dict[str, float] | None:
    """kNN (k = 10, 20), (with ``linear``) the linear probe and (with ``dense``) the dense probe of one fixed model,
    cached in ``cache`` with the dense data it was measured on. ``source(data)`` builds the model's
    :class:`~pwself.eval.source.FeatureSource` (only when something must be measured)."""
    key = _dense_key(dense)
    if cache.exists():
        floor = json.loads(cache.read_text())
        if dense is None or ("hbird_miou" in floor and floor.get("dense_key") == key):
            return floor
    data = EvalData.of_run(cfg)
    src = source(data)
    floor = _scores(features(src, data, "cls", EvalSettings(cache_dir=None, progress=False)), linear)
    if floor is None:
        return None
    if dense is not None:
        res = evaluate(src, None, ["dense"], comparison_settings(dense, feature_cache))["dense"]
        floor.update(miou=res["miou"], hbird_miou=res["hbird"]["miou"], dense_key=key)
    cache.write_text(json.dumps(floor))
    return floor


def random_init_floor(cfg: TrainConfig, cache: Path, linear: bool = True,
                      dense: str | None = None) -> dict[str, float] | None:
    """kNN (k = 10, 20), (with ``linear``) linear probe and (with ``dense``, a dense dataset) the dense probe
    of the configured backbone at its random initialization (the same init a run with ``cfg.seed`` starts
    from), CLS features at the global view size: what pretraining adds is the distance to this row.
    ``None`` for unlabelled data."""
    return _model_floor(cfg, cache, lambda data: _random_init_source(cfg, {"train": data.train, "test": data.test}),
                        linear, dense, str(cache.parent / "features"))


def _dense_key(dense: str | None) -> str | None:
    from pwself.data.dense import dense_key

    return dense_key(dense) if dense else None


def _start_source(cfg: TrainConfig):  # noqa: ANN202 - a FeatureSource
    """The model a run with ``backbone.init`` starts from (its file, loaded as training loads it), with the run's
    normalization, as a feature source."""
    from pwself.eval.source import FeatureSource, file_sha256
    from pwself.init_weights import load_backbone_weights
    from pwself.models import make_vit
    from pwself.runtime import resolve_device

    backbone = make_vit(cfg.backbone, cfg.views.global_size)
    load_backbone_weights(backbone, cfg.backbone.init)
    path = Path(cfg.backbone.init).expanduser()
    key = f"start:{file_sha256(path) if path.is_file() else path.resolve()}:{cfg.views.global_size}"
    return FeatureSource("starting model", backbone.to(resolve_device(cfg.device)).eval(), list(cfg.data.mean),
                         list(cfg.data.std), cfg.views.global_size, key)


def start_floor(cfg: TrainConfig, cache: Path, dense: str | None = None) -> dict[str, float] | None:
    """kNN (k = 10, 20) and (with ``dense``) the dense probe of the starting model of a run with ``backbone.init``:
    what post-training kept or changed is the distance to this row. ``None`` without ``backbone.init`` or for
    unlabelled data."""
    if not cfg.backbone.init:
        return None
    return _model_floor(cfg, cache, lambda data: _start_source(cfg), False, dense, None)


def pixel_dense_floor(cfg: TrainConfig, dense: str, cache: Path) -> dict | None:
    """The dense probe on each patch's raw pixels (the backbone's patch size and input side)."""
    from pwself.eval.dense import DenseSettings, pixel_encoder, probe_encoder

    key = _dense_key(dense)
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("dense_key") == key and "hbird" in stored:
            return stored
    p, size = cfg.backbone.patch_size, cfg.views.global_size
    settings = DenseSettings(cache_dir=str(cache.parent / "features"), progress=False, protocols=DENSE_FLOORS)
    res = probe_encoder(pixel_encoder(p), {"weights": f"pixels{p}"}, dense, cfg.backbone.in_chans, size,
                        [0.5] * cfg.backbone.in_chans, [0.5] * cfg.backbone.in_chans, settings)
    res = {**res, "hbird_miou": res["hbird"]["miou"], "dense_key": key}
    cache.write_text(json.dumps(res))
    return res


def run_floors(run_dir: Path, metric: str = "knn") -> dict[str, float]:
    """The floors of a run's config, by name (``random init``, and ``raw pixels`` when small enough), cached in
    the run folder: the lines a learning-curve plot draws. ``metric``: ``knn`` (k = 10) or ``miou`` (the dense
    probe on the run's ``eval.dense_data``)."""
    from pwself.run.state import read_run_config

    cfg, run = read_run_config(run_dir), RunFolder(run_dir)
    if metric == "miou":
        if not cfg.eval.dense_data:
            raise ValueError(f"{run_dir} has no dense_data in its config: train with eval.dense_data=DIR")
        random = random_init_floor(cfg, run.floor("random_init"), linear=False, dense=cfg.eval.dense_data)
        pixels = pixel_dense_floor(cfg, cfg.eval.dense_data, run.floor("pixels_dense"))
        return {"random init": random["miou"], "raw pixels": pixels["miou"]}
    floors = {"random init": random_init_floor(cfg, run.floor("random_init"), linear=False)["knn10"]}
    pixels = pixel_floor(cfg, run.floor("pixels"))
    if pixels:
        floors["raw pixels"] = pixels["knn10"]
    return floors
