"""pwself beside lightly, and the step's distance from this CPU's float32 GEMM peak (issue 45).

Run as ``python benchmarks/run.py --only peers`` (``--quick`` for a short version). lightly (the ``[peers]``
extra) is built as its own examples build DINO and DINOv2 (``examples/pytorch/dino.py``, ``dinov2.py``): its
``DINOProjectionHead``, ``DINOLoss``, ``IBOTPatchLoss``, ``MaskedVisionTransformerTIMM``, ``random_block_mask``
and ``update_momentum``, around the same timm ViT pwself trains (:func:`pwself.models.make_vit`), with the same
head sizes, views and batch. Both steps get the same views already cut (the transforms are timed apart) and
the same work besides the model: AdamW over the student, gradient clipping at 3, the EMA teacher, the centers.
Two lightly forms: ``by_resolution`` (the global views in one forward, the local ones in another: what its
DINOv2 example and pwself do) and ``per_view`` (one forward per view: what its DINO example does). Ratios are
to ``by_resolution``, the faster one.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pwself.config import TrainConfig
from pwself.models import make_vit
from pwself.views import MultiCropViews, ViewConfig

CLIP = 3.0


def missing() -> str | None:
    """Why the peers cannot be measured (one line), or ``None``."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        return "lightly is not installed: pip install -e '.[peers]' (benchmark 'peers' skipped)"
    return None


def gemm_peak(n: int, repeat: int) -> dict:
    """This machine's float32 matmul throughput at the benchmark's thread count: ``2 n^3`` FLOPs per product."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    best = min(times)  # the peak: the fastest of the repeats
    return {"n": n, "threads": torch.get_num_threads(), "gflop_s": 2 * n**3 / best / 1e9,
            "median_gflop_s": 2 * n**3 / statistics.median(times) / 1e9}


def uint8_views(step, images: Tensor, gen: torch.Generator) -> MultiCropViews:
    """The views pwself's loader hands the step (uint8 crops cut from the originals), cut once."""
    v = step.views.multicrop(images, gen)
    to8 = lambda x: (x * 255).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return MultiCropViews(to8(v.global_crops), to8(v.local_crops), v.boxes, v.flips, v.n_global, v.n_local)


class LightlyStep:
    """One lightly DINO (or DINO + iBOT) step on given normalized views, built as lightly's examples build it."""

    def __init__(self, cfg: TrainConfig, views: MultiCropViews, mean: float, std: float, ibot: bool,
                 per_view: bool = False) -> None:
        from lightly.loss import DINOLoss, IBOTPatchLoss
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM

        h, b = cfg.head, cfg.backbone
        vit = make_vit(b, cfg.views.global_size)
        self.student = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.teacher = copy.deepcopy(self.student)
        width = vit.embed_dim
        def head() -> DINOProjectionHead:
            return DINOProjectionHead(width, h.hidden_dim, h.bottleneck_dim, h.out_dim, freeze_last_layer=0)

        self.student_head, self.teacher_head = head(), head()  # weight norm: a head cannot be deep-copied
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad = False
        self.dino = DINOLoss(output_dim=h.out_dim, warmup_teacher_temp_epochs=0)
        self.ibot = IBOTPatchLoss(output_dim=h.out_dim) if ibot else None
        params = [*self.student.parameters(), *self.student_head.parameters()]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
        self.global_crops = (views.global_crops.float() / 255 - mean) / std
        self.local_crops = (views.local_crops.float() / 255 - mean) / std
        self.n_global, self.n_views, self.per_view = views.n_global, views.n_global + views.n_local, per_view
        self.grid = vit.patch_embed.grid_size

    def _cls(self, model, head, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = model.encode(x, mask=mask)
        return head(features[:, 0]), features

    def loss(self) -> Tensor:
        from lightly.models.utils import random_block_mask

        g, loc = self.global_crops, self.local_crops
        mask = block = None
        if self.ibot is not None:  # lightly's DINOv2 example: block masks on half the global crops
            block = random_block_mask(size=(len(g), *self.grid))
            mask = torch.zeros(len(g), 1 + self.grid[0] * self.grid[1], dtype=torch.bool)
            mask[:, 1:] = block.flatten(1)
        with torch.no_grad():
            chunks = g.chunk(self.n_global) if self.per_view else [g]
            t_out = [self._cls(self.teacher, self.teacher_head, x) for x in chunks]
            t_cls = torch.cat([o for o, _ in t_out])
        if self.per_view:
            s_cls = torch.cat([self._cls(self.student, self.student_head, x)[0]
                               for x in [*g.chunk(self.n_global), *loc.chunk(self.n_views - self.n_global)]])
            s_global_features = None
        else:
            s_global, s_global_features = self._cls(self.student, self.student_head, g, mask)
            s_cls = torch.cat([s_global, self._cls(self.student, self.student_head, loc)[0]])
        loss = self.dino(list(t_cls.chunk(self.n_global)), list(s_cls.chunk(self.n_views)), teacher_temp=0.04)
        if self.ibot is not None:
            t_features = torch.cat([f for _, f in t_out])
            with torch.no_grad():
                t_patch = self.teacher_head(t_features[mask])
            s_patch = self.student_head(s_global_features[mask])
            loss = loss + self.ibot(t_patch, s_patch, mask=block, teacher_temp=0.04)
        return loss

    def step_once(self) -> None:
        from lightly.models.utils import update_momentum

        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.student_head.cancel_last_layer_gradients(current_epoch=1)
        self.optimizer.step()
        update_momentum(self.student, self.teacher, m=0.996)
        update_momentum(self.student_head, self.teacher_head, m=0.996)


class PwselfStep:
    """pwself's step on the same uint8 views (photometric augmentation off: the transforms are timed apart)."""

    def __init__(self, runner, views: MultiCropViews) -> None:
        self.runner, self.views = runner, views

    def loss(self) -> Tensor:
        r = self.runner
        return r.step.forward(self.views, r.cfg.loss.teacher_temp, r.gen).terms["loss"]

    def step_once(self) -> None:
        r = self.runner
        r.step(self.views, r.cfg.loss.teacher_temp, r.cfg.optim.momentum_teacher, r.gen)


def _flops(loss: Callable[[], Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss().backward()
    return counter.get_total_flops()


def _saved_bytes(loss: Callable[[], Tensor]) -> int:
    """Bytes autograd saves for backward in one forward (the activation memory; storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss()
    out.backward()
    return sum(seen.values())


def _interleaved(steps: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()
    for _ in range(repeat):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def compare_steps(make_runner: Callable[[str, list[str]], object], extra: list[str], batch: int, repeat: int,
                  peak_gflop_s: float) -> dict:
    """Step time, FLOPs, achieved FLOP/s (and its fraction of the GEMM peak) and activation bytes of pwself's DINO,
    iBOT and PWML and lightly's DINO and iBOT, on the same views."""
    runners = {name: make_runner(objective, [*extra, "photometric.mode=none", f"optim.clip_grad={CLIP}"])
               for name, objective in (("pwself_dino", "dino"), ("pwself_ibot", "ibot"), ("pwself_pwml", "pwml"))}
    first = runners["pwself_dino"]
    views = uint8_views(first.step, first.images, torch.Generator().manual_seed(0))
    mean, std = float(first.step.views.mean.flatten()[0]), float(first.step.views.std.flatten()[0])
    steps = {name: PwselfStep(r, views) for name, r in runners.items()}
    cfg = first.cfg
    steps["lightly_dino"] = LightlyStep(cfg, views, mean, std, ibot=False)
    steps["lightly_dino_per_view"] = LightlyStep(cfg, views, mean, std, ibot=False, per_view=True)
    steps["lightly_ibot"] = LightlyStep(cfg, views, mean, std, ibot=True)
    med = _interleaved({k: s.step_once for k, s in steps.items()}, repeat)
    flops = {k: _flops(s.loss) for k, s in steps.items()}
    saved = {k: _saved_bytes(s.loss) for k, s in steps.items()}
    for s in steps.values():
        (s.runner.step.optimizer if isinstance(s, PwselfStep) else s.optimizer).zero_grad(set_to_none=True)
    achieved = {k: flops[k] / med[k] / 1e9 for k in steps}
    return {
        "batch": batch, "step_s": med, "flops": flops, "saved_mb": {k: v / 2**20 for k, v in saved.items()},
        "achieved_gflop_s": achieved, "fraction_of_gemm_peak": {k: a / peak_gflop_s for k, a in achieved.items()},
        "ratio": {
            "pwself_dino_over_lightly_dino": med["pwself_dino"] / med["lightly_dino"],
            "pwself_ibot_over_lightly_ibot": med["pwself_ibot"] / med["lightly_ibot"],
            "pwself_pwml_over_lightly_dino": med["pwself_pwml"] / med["lightly_dino"],
            "lightly_dino_per_view_over_lightly_dino": med["lightly_dino_per_view"] / med["lightly_dino"],
        },
        "memory_ratio": {
            "pwself_dino_over_lightly_dino": saved["pwself_dino"] / saved["lightly_dino"],
            "pwself_ibot_over_lightly_ibot": saved["pwself_ibot"] / saved["lightly_ibot"],
            "pwself_pwml_over_lightly_dino": saved["pwself_pwml"] / saved["lightly_dino"],
        },
    }


def step_breakdown(runner, repeat: int) -> dict:
    """Where a pwself step's time goes, each part timed alone with the step's own modules: views and photometric
    augmentation, matching, the teacher backbone forward, the student backbone forward + backward, heads and
    losses (the forward + backward of the whole loss minus the parts before), the optimizer (clipping
    included), the EMA teacher and centers; shares of the sum."""
    from pwself.models import ema_update

    step, cfg, gen, images = runner.step, runner.cfg, runner.gen, runner.images
    views = step.views(images, gen)

    def backbones_forward_backward() -> None:
        tokens = step.model.encode([views.global_crops, views.local_crops])
        sum(t.cls.sum() + t.patches.sum() for t in tokens).backward()

    def teacher_forward() -> None:
        with torch.no_grad():
            step.teacher.encode([views.global_crops])

    def whole_loss() -> None:
        runner.forward().terms["loss"].backward()

    def optimizer() -> None:
        torch.nn.utils.clip_grad_norm_(step.trainable(), CLIP)
        step.optimizer.step()

    def ema() -> None:
        ema_update(step.teacher, step.model, cfg.optim.momentum_teacher)

    parts = {"views_and_augment": lambda: step.views(images, gen), "matching": runner.matching_only,
             "teacher_backbone_forward": teacher_forward,
             "student_backbone_forward_backward": backbones_forward_backward,
             "whole_forward_backward": whole_loss, "optimizer": optimizer, "ema": ema}
    t = _interleaved(parts, repeat)
    cut = _interleaved({"cut": lambda: step.views.multicrop(images, gen)}, repeat)["cut"]  # matching_only cuts too
    t["matching"] = max(t["matching"] - cut, 0.0)
    t["heads_and_losses"] = max(t.pop("whole_forward_backward") - sum(t[k] for k in (
        "views_and_augment", "matching", "teacher_backbone_forward", "student_backbone_forward_backward")), 0.0)
    step.optimizer.zero_grad(set_to_none=True)
    total = sum(t.values())
    return {"seconds": t, "share": {k: v / total for k, v in t.items()}}


def photo_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` 500 x 375 JPEGs of noise (quality 90) in ``folder``: the benchmarks' photo folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for k in range(n):
        path = folder / f"photo{k}.jpg"
        Image.fromarray((rng.random((375, 500, 3)) * 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def transforms(n: int, batch: int, local_views: int) -> dict:
    """Images/s of the multi-crop transforms on one worker over the same 500x375 JPEG folder: pwself's loader
    (decode and crops in the worker) plus its photometric augmentation (in the step, one thread here, image and
    patch mode) against lightly's ``DINOTransform`` (decode, crops and photometric augmentation in the worker)."""
    from lightly.transforms.dino_transform import DINOTransform
    from PIL import Image

    from pwself.augment import PhotometricAugment, PhotometricConfig
    from pwself.data.crops import FolderMultiCrop, ViewLoader

    spec = ViewConfig(2, local_views, 224, 96, (0.4, 1.0), (0.05, 0.4), 0.5)
    out: dict = {"images": n, "batch": batch, "original": "500x375 JPEG", "views": f"2 x 224 + {local_views} x 96",
                 "workers": 1}
    with tempfile.TemporaryDirectory() as tmp:
        files = photo_jpegs(Path(tmp), n)
        batches = list(torch.arange(n).split(batch))
        loader = ViewLoader(FolderMultiCrop(files, 3, spec, seed=0), 1, pin_memory=False)
        cut = []
        for v in loader.epoch(batches[:1], 0):  # start the worker
            pass
        t0 = time.perf_counter()
        for v in loader.epoch(batches, 1):
            cut.append(v)
        crop_s = (time.perf_counter() - t0) / n
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a loader worker
        try:
            aug_s = {}
            for mode in ("image", "patch"):
                aug = PhotometricAugment(PhotometricConfig(mode=mode), 16)
                g = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                for v in cut:
                    aug(v.global_crops.float() / 255, g)
                    aug(v.local_crops.float() / 255, g)
                aug_s[mode] = (time.perf_counter() - t0) / n
        finally:
            torch.set_num_threads(threads)
        transform = DINOTransform(global_crop_size=224, local_crop_size=96, n_local_views=local_views)

        class Folder(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return n

            def __getitem__(self, i: int):
                return transform(Image.open(files[i]).convert("RGB"))

        dl = torch.utils.data.DataLoader(Folder(), batch_size=batch, num_workers=1, persistent_workers=True)
        next(iter(dl))  # start the worker
        t0 = time.perf_counter()
        for _ in dl:
            pass
        lightly_s = (time.perf_counter() - t0) / n
    out.update({
        "pwself_crop_images_per_s": 1 / crop_s,
        "pwself_images_per_s": {m: 1 / (crop_s + a) for m, a in aug_s.items()},
        "lightly_dino_transform_images_per_s": 1 / lightly_s,
        "ratio_pwself_over_lightly_time": {m: (crop_s + a) / lightly_s for m, a in aug_s.items()},
        "patch_over_image_augment": aug_s["patch"] / aug_s["image"],
    })
    return out
