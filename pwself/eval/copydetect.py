"""Copy detection (EVAL_PROTOCOLS §4, dino ``eval_copy_detection.py``) and a generator of copy-detection sets.

Layout (Copydays, or what :func:`generate_copydetect_set` writes under a folder)::

    original/XXXX00.jpg            database (one per group XXXX)
    strong/XXXXYY.jpg              strongly distorted copies: positives = originals with the same XXXX
    jpegqual/<q>/, crops/<c>/      optional blocks, 1:1 with the originals by sorted position
    distractors/ (optional)        appended to the database, never positives
    whitening/ (optional)          images whose descriptors learn the PCA whitening

Descriptor: CLS ⊕ GeM(p = 4) of the patch tokens; whitening: ``mu`` of the whitening set subtracted,
PCA of the **uncentred** covariance (the reference quirk), whit = 0.5, full dimension; L2 norm; cosine
search; AP on the top 20 with ``nres`` = all positives; mAP per block (the reported block: ``strong``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pwself.data.datasets import IMAGE_EXTENSIONS, DatasetError
from pwself.eval.metrics import l2n, learn_whitening_dino, score_ap_from_ranks
from pwself.eval.registry import Protocol

__all__ = ["CopydaysLayout", "read_copydays", "copydetect_map", "evaluate_copydetect", "generate_copydetect_set",
           "SquareImageFiles"]


class SquareImageFiles(Dataset):
    """Image files resized to a ``size x size`` square (aspect ratio not kept, bicubic), as dino does."""

    def __init__(self, files: list[Path], size: int, channels: int = 3) -> None:
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("L" if self.channels == 1 else "RGB").resize((self.size, self.size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise DatasetError(f"cannot read image {self.files[i]} ({type(e).__name__}): fix or remove it") from e
        t = torch.from_numpy(arr)
        return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)), -1


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class CopydaysLayout:
    """Files of a copy-detection set, with the ground truth of every query block."""

    def __init__(self, originals: list[Path], blocks: dict[str, list[Path]], positives: dict[str, list[list[int]]],
                 distractors: list[Path], whitening: list[Path]) -> None:
        self.originals, self.blocks, self.positives = originals, blocks, positives
        self.distractors, self.whitening = distractors, whitening


def read_copydays(root: str | Path) -> CopydaysLayout:
    """Read the Copydays layout under ``root`` and build the ground truth (see module docstring)."""
    root = Path(root)
    if not (root / "original").is_dir():
        raise DatasetError(f"no {root}/original folder: point --data-path at a Copydays-layout directory")
    originals = _images(root / "original")
    if not originals:
        raise DatasetError(f"{root}/original has no images")
    prefix = [p.name[:4] for p in originals]
    blocks: dict[str, list[Path]] = {}
    positives: dict[str, list[list[int]]] = {}
    if (root / "strong").is_dir():
        strong = _images(root / "strong")
        blocks["strong"] = strong
        positives["strong"] = [[i for i, pre in enumerate(prefix) if pre == q.name[:4]] for q in strong]
        orphans = [q.name for q, pos in zip(strong, positives["strong"]) if not pos]
        if orphans:
            raise DatasetError(f"strong queries with no original of the same 4-character prefix: {orphans[:5]}")
    for group in ("jpegqual", "crops"):
        if (root / group).is_dir():
            for sub in sorted((root / group).iterdir(), key=lambda p: p.name):
                files = _images(sub)
                if [p.name for p in files] != [p.name for p in originals]:
                    raise DatasetError(f"{sub} must hold exactly the files of original/ (1:1 ground truth by name)")
                blocks[f"{group}/{sub.name}"] = files
                positives[f"{group}/{sub.name}"] = [[i] for i in range(len(files))]
    blocks["original"] = originals
    positives["original"] = [[i] for i in range(len(originals))]
    distractors = _images(root / "distractors") if (root / "distractors").is_dir() else []
    whitening = _images(root / "whitening") if (root / "whitening").is_dir() else []
    return CopydaysLayout(originals, blocks, positives, distractors, whitening)


def copydetect_map(
    database: np.ndarray,
    queries: dict[str, np.ndarray],
    positives: dict[str, list[list[int]]],
    whitening: np.ndarray | None = None,
    top_k: int = 20,
) -> dict[str, float]:
    """mAP per query block from raw descriptors.

    Args:
        database: ``[N_db, D]`` descriptors (originals first, then distractors).
        queries: Block name -> ``[N_q, D]`` descriptors.
        positives: Block name -> per query the database indices of its positives.
        whitening: ``[N_w, D]`` descriptors of the whitening set (``None``: no whitening).
        top_k: Ranks kept per query (AP counts positives in the top ``top_k`` only).

    Returns:
        Block name -> mAP (fraction).
    """
    db = np.asarray(database, dtype=np.float64)
    if whitening is not None and len(whitening):
        mu, pca = learn_whitening_dino(whitening)
        db = pca.apply(db - mu)
    db = l2n(db)
    out = {}
    for name, q in queries.items():
        q = np.asarray(q, dtype=np.float64)
        if q.shape[1] != database.shape[1]:
            raise ValueError(f"query block {name} has {q.shape[1]}-d descriptors, the database {database.shape[1]}-d")
        if whitening is not None and len(whitening):
            q = pca.apply(q - mu)
        sims = l2n(q) @ db.T
        k = min(top_k, db.shape[0])
        ranks = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        aps = []
        for row, pos in zip(ranks, positives[name]):
            if not pos:
                raise ValueError(f"a query of block {name} has no positive")
            hit = np.flatnonzero(np.isin(row, pos))
            aps.append(score_ap_from_ranks(hit, len(pos)))
        out[name] = float(np.mean(aps))
    return out


def _distort(im, rng: random.Random, backgrounds: list):  # noqa: ANN001, ANN202 - PIL images
    """A strong, random combination of distortions (crop, rotation, paste, blur, noise, JPEG)."""
    import io

    from PIL import Image, ImageFilter

    im = im.convert("RGB")
    w, h = im.size
    if rng.random() < 0.8:  # crop 50-90% of each side
        fw, fh = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)
        x0, y0 = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
        im = im.crop((int(x0), int(y0), int(x0 + fw * w), int(y0 + fh * h))).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        im = im.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC, expand=False)
    if backgrounds and rng.random() < 0.4:  # paste onto another image
        bg = rng.choice(backgrounds).convert("RGB").resize((w, h))
        s = rng.uniform(0.5, 0.8)
        small = im.resize((max(1, int(w * s)), max(1, int(h * s))))
        bg.paste(small, (int(rng.uniform(0, w - small.size[0])), int(rng.uniform(0, h - small.size[1]))))
        im = bg
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.5:
        arr = np.asarray(im, dtype=np.float32)
        arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(5, 25), arr.shape)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(10, 50))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def generate_copydetect_set(
    source: str | Path,
    out: str | Path,
    n_originals: int = 50,
    copies_per_original: int = 2,
    n_distractors: int = 50,
    n_whitening: int = 50,
    seed: int = 0,
) -> CopydaysLayout:
    """Build a copy-detection set from any image folder, in the Copydays layout.

    Originals, distractors and whitening images are disjoint files of ``source`` (recursively); each
    original gets ``copies_per_original`` strong copies (random crop, rotation, paste onto a distractor,
    blur, noise, JPEG 10-50).
    """
    from PIL import Image

    files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    need = n_originals + n_distractors + n_whitening
    if len(files) < need:
        raise DatasetError(f"{source} has {len(files)} images; {need} are needed "
                           f"({n_originals} originals + {n_distractors} distractors + {n_whitening} whitening)")
    if n_originals > 9999 or copies_per_original > 99:
        raise ValueError("at most 9999 originals and 99 copies each (XXXXYY names)")
    rng = random.Random(seed)
    files = files[:]
    rng.shuffle(files)
    originals, distractors = files[:n_originals], files[n_originals : n_originals + n_distractors]
    whitening = files[n_originals + n_distractors : need]
    out = Path(out)
    for sub in ("original", "strong", "distractors", "whitening"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    backgrounds = [Image.open(p) for p in distractors[:10]]
    for g, path in enumerate(originals):
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.save(out / "original" / f"{g:04d}00.jpg", quality=95)
            for c in range(1, copies_per_original + 1):
                _distort(im, rng, backgrounds).save(out / "strong" / f"{g:04d}{c:02d}.jpg", quality=95)
    for sub, group in (("distractors", distractors), ("whitening", whitening)):
        for k, path in enumerate(group):
            with Image.open(path) as im:
                im.convert("RGB").save(out / sub / f"{k:05d}.jpg", quality=95)
    return read_copydays(out)


def evaluate_copydetect(
    backbone: torch.nn.Module,
    layout: CopydaysLayout,
    mean: list[float],
    std: list[float],
    imsize: int,
    channels: int = 3,
    whiten: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """mAP per block (fractions) of CLS ⊕ GeM descriptors of square-resized images, as dino does."""
    from pwself.eval.features import extract_features

    def describe(files: list[Path]) -> np.ndarray:
        feats, _ = extract_features(backbone, SquareImageFiles(files, imsize, channels), mean, std, size=None,
                                    pooling="cls+gem", normalize=False, batch_size=16, progress=progress,
                                    device=next(backbone.parameters()).device)
        return feats.double().numpy()

    database = describe(layout.originals + layout.distractors)
    queries = {name: describe(files) for name, files in layout.blocks.items()}
    white = describe(layout.whitening) if whiten and layout.whitening else None
    return copydetect_map(database, queries, layout.positives, white)


@dataclass(frozen=True)
class CopydetectSettings:
    """Copy detection's knobs.

    Attributes:
        path: The Copydays-layout folder (``original/``, ``strong/``, ...).
        generate_from: An image folder to build the set at ``path`` from first.
        whiten: PCA whitening learnt on the set's whitening images.
        imsize: Square input side (default: the model's).
    """

    path: str | None = None
    generate_from: str | None = None
    whiten: bool = True
    imsize: int | None = None


def _flags(p: argparse.ArgumentParser, alone: bool) -> None:
    if not alone:
        p.add_argument("--copydetect-path", help="Copydays-layout folder: adds copy detection")
        return
    p.add_argument("--data-path", required=True, help="Copydays-layout folder (original/, strong/, ...)")
    p.add_argument("--generate-from", help="first build the set at --data-path from this image folder")
    p.add_argument("--imsize", type=int, help="square input side (default: the model's global size)")
    p.add_argument("--no-whitening", action="store_true", help="skip PCA whitening")


def _from_flags(args: argparse.Namespace, alone: bool) -> CopydetectSettings | None:
    if not alone:
        return CopydetectSettings(args.copydetect_path) if args.copydetect_path else None
    return CopydetectSettings(args.data_path, args.generate_from, not args.no_whitening, args.imsize)


def _run(source: Any, options: CopydetectSettings, settings: Any) -> dict[str, float]:
    if not options.path:
        raise ValueError("copy detection needs a Copydays-layout folder: pass --copydetect-path DIR")
    layout = (generate_copydetect_set(options.generate_from, options.path) if options.generate_from
              else read_copydays(options.path))
    return evaluate_copydetect(source.backbone, layout, source.mean, source.std, options.imsize or source.size,
                               source.backbone.patch_embed.proj.in_channels, whiten=options.whiten,
                               progress=settings.progress)


def _table(per_model: dict[str, Any], note: str) -> list[str]:
    blocks = list(next(iter(per_model.values())).keys())
    lines = ["### Copy detection mAP (CLS + GeM, top 20)", "", "| model | " + " | ".join(blocks) + " |",
             "|---|" + "---|" * len(blocks)]
    lines += [f"| {name} | " + " | ".join(f"{res[b]:.3f}" for b in blocks) + " |" for name, res in per_model.items()]
    return [*lines, ""]


PROTOCOL = Protocol("copydetect", "copy detection mAP (Copydays layout, CLS+GeM, PCA whitening)", CopydetectSettings,
                    _run, _table, scores=lambda res: {f"copy detection {b}": 100 * v for b, v in res.items()},
                    features=False, flags=_flags, from_flags=_from_flags)
