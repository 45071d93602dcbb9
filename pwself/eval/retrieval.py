"""Image retrieval with the revisited Oxford/Paris protocol (EVAL_PROTOCOLS §5).

Ground truth ``gnd_<ds>.pkl`` (or ``.json``) holds ``imlist`` (database names), ``qimlist`` (query names)
and ``gnd`` (per query ``easy``, ``hard``, ``junk`` index lists and ``bbx``). Images are
``<root>/<ds>/jpg/<name>.jpg``; any other query/database set in the same format works. Queries are
cropped to ``bbx`` (revisitop) unless ``crop_queries=False`` (dino's numbers). Images keep their aspect
ratio (``thumbnail`` to ``imsize``, never upsampled) and go through the model one at a time.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pwself.data.datasets import DatasetError
from pwself.eval.metrics import revisited_map
from pwself.eval.registry import Protocol
from pwself.models import forward_tokens

__all__ = ["load_ground_truth", "retrieval_features", "evaluate_retrieval", "STANDARD_SIZES"]

STANDARD_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}


class _GndUnpickler(pickle.Unpickler):
    """Only plain containers and numpy arrays: a ground-truth file cannot execute code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # noqa: ANN202 - a class, or the error
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a ground-truth file")


def load_ground_truth(path: str | Path, image_dir: str | Path | None = None, ext: str = ".jpg") -> dict[str, Any]:
    """Load and check a ground-truth file.

    Args:
        path: ``gnd_<ds>.pkl`` or a JSON file with the same keys.
        image_dir: If given, every database and query image must exist there as ``<name><ext>``.
        ext: Image file extension.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"ground-truth file {path} does not exist")
    try:
        if path.suffix == ".json":
            cfg = json.loads(path.read_text())
        else:
            with open(path, "rb") as f:
                cfg = _GndUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read ground truth {path} ({type(e).__name__}: {e})") from e
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise DatasetError(f"ground truth {path} has no {key!r}: expected imlist, qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise DatasetError(f"ground truth {path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    n_db = len(cfg["imlist"])
    for i, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g.get(key, []), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n_db):
                raise DatasetError(f"ground truth {path}: query {i} {key} index out of range 0..{n_db - 1}")
    name = path.stem.removeprefix("gnd_")
    if name in STANDARD_SIZES and (n_db, len(cfg["qimlist"])) != STANDARD_SIZES[name]:
        raise DatasetError(f"{path}: {n_db} database / {len(cfg['qimlist'])} query images, expected "
                           f"{STANDARD_SIZES[name]} for {name}")
    if image_dir is not None:
        names = list(cfg["imlist"]) + list(cfg["qimlist"])
        missing = [n for n in names if not (Path(image_dir) / f"{n}{ext}").exists()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of the ground truth are missing from {image_dir}, "
                               f"e.g. {missing[0]}{ext}: the ground truth does not match the images")
    return cfg


def _load_image(path: Path, imsize: int, channels: int, bbx: list[float] | None) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if bbx is not None:
                im = im.crop(tuple(int(round(v)) for v in bbx))
            im.thumbnail((imsize, imsize), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}): fix or remove it") from e
    t = torch.from_numpy(arr).float() / 255
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


@torch.inference_mode()
def retrieval_features(
    backbone: nn.Module,
    files: list[Path],
    mean: list[float],
    std: list[float],
    imsize: int,
    bboxes: list[list[float] | None] | None = None,
    multiscale: bool = False,
    channels: int = 3,
) -> np.ndarray:
    """L2-normalized CLS descriptors, one image at a time (sizes differ), optional multi-scale average; on
    the backbone's device."""
    p = backbone.patch_embed.patch_size[0]
    device = next(backbone.parameters()).device
    out = []
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    for k, f in enumerate(files):
        x = ((_load_image(f, imsize, channels, bboxes[k] if bboxes else None) - m) / s)[None].to(device)
        scales = (1.0, 1 / 2**0.5, 0.5) if multiscale else (1.0,)
        v = 0
        for sc in scales:
            xs = x if sc == 1 else F.interpolate(x, scale_factor=sc, mode="bilinear", align_corners=False)
            h, w = xs.shape[-2] // p * p, xs.shape[-1] // p * p  # floor to the patch grid
            if h == 0 or w == 0:
                raise DatasetError(f"image {f} is smaller than one {p}px patch at scale {sc:.2f}: raise --imsize")
            v = v + forward_tokens(backbone, xs[..., :h, :w]).cls
        v = v / len(scales)
        out.append(F.normalize(v, dim=1)[0].float().cpu().numpy())
    return np.stack(out)


def evaluate_retrieval(
    backbone: nn.Module,
    gnd_path: str | Path,
    image_dir: str | Path,
    mean: list[float],
    std: list[float],
    imsize: int = 224,
    crop_queries: bool = True,
    multiscale: bool = False,
    channels: int = 3,
) -> dict[str, Any]:
    """Revisited E/M/H mAP (x100) of a backbone's CLS descriptors on a query/database set."""
    cfg = load_ground_truth(gnd_path, image_dir)
    image_dir = Path(image_dir)
    db = retrieval_features(backbone, [image_dir / f"{n}.jpg" for n in cfg["imlist"]], mean, std, imsize,
                            channels=channels, multiscale=multiscale)
    bboxes = [list(g["bbx"]) if crop_queries and "bbx" in g else None for g in cfg["gnd"]]
    q = retrieval_features(backbone, [image_dir / f"{n}.jpg" for n in cfg["qimlist"]], mean, std, imsize,
                           bboxes=bboxes, channels=channels, multiscale=multiscale)
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    res = revisited_map(ranks, cfg["gnd"])
    return {"crop_queries": crop_queries, "multiscale": multiscale, "imsize": imsize, **res}


@dataclass(frozen=True)
class RetrievalSettings:
    """Retrieval's knobs.

    Attributes:
        gnd: The ground truth (``gnd_<ds>.pkl``, or ``.json`` with imlist/qimlist/gnd).
        images: The image folder (default: ``jpg/`` beside the ground truth).
        imsize: Longest side of every image (thumbnail).
        crop_queries: Crop queries to their box (the revisited protocol); dino's numbers use full queries.
        multiscale: Average descriptors over scales 1, 1/sqrt2, 1/2.
    """

    gnd: str | None = None
    images: str | None = None
    imsize: int = 224
    crop_queries: bool = True
    multiscale: bool = False


def _flags(p: argparse.ArgumentParser, alone: bool) -> None:
    p.add_argument("--gnd", required=alone, help="gnd_<ds>.pkl (or .json with imlist/qimlist/gnd)"
                   + ("" if alone else ": adds image retrieval"))
    p.add_argument("--images", help="image folder (default: jpg/ beside the gnd file)")
    if alone:
        p.add_argument("--imsize", type=int, default=224, help="longest side (thumbnail, default 224)")
        p.add_argument("--no-crop-queries", action="store_true", help="use full query images (dino's numbers)")
        p.add_argument("--multiscale", action="store_true", help="average descriptors over scales 1, 1/sqrt2, 1/2")


def _from_flags(args: argparse.Namespace, alone: bool) -> RetrievalSettings | None:
    if not alone:
        return RetrievalSettings(args.gnd, args.images) if args.gnd else None
    return RetrievalSettings(args.gnd, args.images, args.imsize, not args.no_crop_queries, args.multiscale)


def _run(source: Any, options: RetrievalSettings, settings: Any) -> dict[str, Any]:
    if not options.gnd:
        raise ValueError("retrieval needs a ground-truth file: pass --gnd FILE")
    images = options.images or str(Path(options.gnd).parent / "jpg")
    return evaluate_retrieval(source.backbone, options.gnd, images, source.mean, source.std, imsize=options.imsize,
                              crop_queries=options.crop_queries, multiscale=options.multiscale,
                              channels=source.backbone.patch_embed.proj.in_channels)


def _table(per_model: dict[str, Any], note: str) -> list[str]:
    lines = ["### Retrieval mAP (revisited protocol, %)", "", "| model | E | M | H | crop queries |",
             "|---|---|---|---|---|"]
    for name, res in per_model.items():
        cells = [f"{res[s]['mAP']:.2f}" if s in res else "n/a" for s in ("E", "M", "H")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res['crop_queries']} |")
    return [*lines, ""]


PROTOCOL = Protocol("retrieval", "revisited Oxford/Paris retrieval mAP (E/M/H)", RetrievalSettings, _run, _table,
                    scores=lambda res: {f"retrieval {s}": res[s]["mAP"] for s in ("E", "M", "H") if s in res},
                    features=False, flags=_flags, from_flags=_from_flags)
