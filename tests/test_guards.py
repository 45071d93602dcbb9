"""Issue 40: quick tests that catch the bugs planted in the newest code, each against an independent reference:
iBOT's patch center, dinov2's mask sampling, a teacher without a graph, Sinkhorn-Knopp split over ranks, every
element of the cache keys, and every setting of the step reaching what the step computes."""

import math
import threading

import pytest
import torch
from test_train import build_parts, tiny_config

from pwself.cli import main
from pwself.config import config_to_dict, load_config
from pwself.losses import sinkhorn_knopp
from pwself.masking import draw_masks
from pwself.models import forward_tokens
from pwself.objectives.base import view_grids
from pwself.schedules import apply_schedules, make_schedules
from pwself.step import build_step, distill_step
from pwself.views import MultiCrop


# --- iBOT's patch center --------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_head", ["shared", "separate"])
def test_ibot_patch_center_moves_to_the_ema_of_the_masked_cells_teacher_outputs(patch_head):
    """C <- m C + (1 - m) mean over the masked cells of the teacher head's output on the unmasked crop, the
    reference computed here from the teacher's backbone and head directly."""
    cfg = tiny_config(**{"loss.objective": "ibot", "head.patch_head": patch_head, "loss.center_momentum": 0.7})
    student, teacher, objective = build_parts(cfg, torch.float64)
    with torch.no_grad():
        objective.patch_center.center.normal_()
    c0 = objective.patch_center.center.clone()
    views = MultiCrop.from_config(cfg.views)(torch.rand(4, 1, 28, 28, dtype=torch.float64),
                                             torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    out = distill_step(student, teacher, objective, views, 0.04, gen)
    objective.update_centers(out.teacher)
    gen.set_state(state)  # the same draws: the masks the step used
    with torch.no_grad():
        t_tokens = teacher.encode([views.global_crops])
        selection = objective.select(views, view_grids(views, 4), t_tokens, gen)
        masks = selection.masked.masks  # [G * B, T], True where the student saw the mask token
        tokens = forward_tokens(teacher.backbone, views.global_crops).patches  # unmasked: the teacher's view
        head = teacher.patch_head or teacher.head
        cells = head(tokens[masks])  # each masked cell's teacher output, once
    assert masks.any() and cells.shape[0] == int(masks.sum())
    expected = 0.7 * c0 + 0.3 * cells.mean(0, keepdim=True)
    torch.testing.assert_close(objective.patch_center.center, expected, rtol=1e-10, atol=1e-12)


# --- dinov2's masks -------------------------------------------------------------------------------------------
class _Draws:
    """Python's random as dinov2 calls it (uniform, randint with both ends), fed from a torch generator."""

    def __init__(self, generator):
        self.g = generator

    def uniform(self, a, b):
        return a + (b - a) * float(torch.rand((), generator=self.g, dtype=torch.float64))

    def randint(self, a, b):
        return int(torch.randint(a, b + 1, (), generator=self.g))


def _dinov2_masking_generator(height, width, num_masking_patches, rng):
    """dinov2's MaskingGenerator.__call__ and _mask (min 4 patches, aspect 0.3 to 1/0.3, at most half the grid),
    written out from its code: cell by cell, as there."""
    max_num_patches = 0.5 * height * width
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = [[0] * width for _ in range(height)]

    def one_block(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(4, max_mask_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count = 0
    while count < num_masking_patches:
        delta = one_block(min(num_masking_patches - count, max_num_patches))
        if delta == 0:
            break
        count += delta
    return torch.tensor(mask, dtype=torch.bool)


def _dinov2_collate_masks(b, grid, ratio, probability, generator):
    """dinov2's collate_data_and_cast: int(B * p) crops masked, crop i at int(N * uniform(probs[i], probs[i+1]))
    over linspace(ratio, n + 1) bins, the others unmasked, shuffled (here by torch's randperm, as pwself does)."""
    n = grid[0] * grid[1]
    n_masked = int(b * probability)
    probs = torch.linspace(*ratio, n_masked + 1, dtype=torch.float64).tolist()
    rng = _Draws(generator)
    masks = [_dinov2_masking_generator(*grid, int(n * rng.uniform(probs[i], probs[i + 1])), rng)
             for i in range(n_masked)]
    masks += [torch.zeros(grid, dtype=torch.bool)] * (b - n_masked)
    order = torch.randperm(b, generator=generator).tolist()
    return torch.stack([masks[i] for i in order]).flatten(1)


@pytest.mark.parametrize("b,grid,ratio,p", [(16, (14, 14), (0.1, 0.5), 0.5), (10, (6, 9), (0.2, 0.6), 0.8),
                                            (7, (4, 4), (0.1, 0.5), 1.0)])
def test_masks_are_dinov2s_draw_for_draw(b, grid, ratio, p):
    for seed in range(25):
        got = draw_masks(b, grid, ratio, p, torch.Generator().manual_seed(seed))
        want = _dinov2_collate_masks(b, grid, ratio, p, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want), seed


def test_masked_counts_fall_in_their_bins_over_many_draws():
    """Per step, the masked crops' cell counts sorted are one per bin of ratio (at most the bin's top, and
    rarely below its bottom: only when ten draws in a row add nothing)."""
    n, below = 14 * 14, 0
    for seed in range(60):
        counts = sorted(int(c) for c in draw_masks(16, (14, 14), (0.1, 0.5), 0.5,
                                                   torch.Generator().manual_seed(seed)).sum(1) if c)
        assert len(counts) == 8
        bounds = torch.linspace(0.1, 0.5, 9, dtype=torch.float64).tolist()
        for i, c in enumerate(counts):
            assert c <= int(n * bounds[i + 1]), (seed, i, c)
            below += c < int(n * bounds[i]) - 3
    assert below < 0.05 * 60 * 8


# --- the teacher ----------------------------------------------------------------------------------------------
def test_the_teacher_never_requires_grad_and_its_outputs_carry_no_graph():
    cfg = load_config(None, ["data.kind=synthetic", "backbone.embed_dim=32", "backbone.depth=1",
                             "backbone.num_heads=2", "head.out_dim=16", "loss.objective=ibot"])
    step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
    assert not any(p.requires_grad for p in step.teacher.parameters())
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    step.teacher.requires_grad_(True)  # even so, the teacher's forward builds no graph: it runs under no_grad
    out = step.forward(images, 0.04, torch.Generator().manual_seed(0))
    assert out.teacher.cls.grad_fn is None and not out.teacher.cls.requires_grad
    assert out.teacher.patch is not None and out.teacher.patch.grad_fn is None
    assert out.teacher.global_patches is not None and out.teacher.global_patches.grad_fn is None  # its backbone too
    step.teacher.requires_grad_(False)
    out.terms["loss"].backward()
    assert all(p.grad is None for p in step.teacher.parameters())


# --- Sinkhorn-Knopp over ranks ----------------------------------------------------------------------------------
def test_sinkhorn_knopp_split_over_two_ranks_equals_one_process(monkeypatch):
    """Two ranks in two threads, each with half the rows, their all-reduces met by a barrier (sum or max over
    both): each rank's targets are its rows of the one-process targets."""
    import pwself.losses as losses

    z = torch.randn(10, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    whole = sinkhorn_knopp(z, 0.1)
    barrier, slots, results = threading.Barrier(2), {}, {}
    local = threading.local()

    def fake_all_reduce(x, op="sum"):
        slots[local.rank] = x.clone()
        barrier.wait()
        both = torch.stack([slots[0], slots[1]])
        x.copy_(both.amax(0) if op == "max" else both.sum(0))
        barrier.wait()
        return x

    monkeypatch.setattr(losses, "_all_reduce", fake_all_reduce)

    def rank(r):
        local.rank = r
        results[r] = sinkhorn_knopp(z[5 * r: 5 * (r + 1)], 0.1)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat([results[0], results[1]]), whole, rtol=1e-12, atol=1e-15)


# --- cache keys: every element invalidates ------------------------------------------------------------------------
def test_every_element_of_the_shrunk_copy_and_scan_keys_invalidates(tmp_path, monkeypatch):
    import os
    import time
    from types import SimpleNamespace

    from pwself.data.datasets import _stamp, scan_images, stamp_of
    from pwself.data.photos import shrunk_path, write_synthetic_photo

    fields = {"st_size": 100, "st_mtime_ns": 5, "st_ctime_ns": 6, "st_ino": 7}
    for name in fields:  # each alone (a coarse-clock filesystem can keep both times across a write)
        assert stamp_of(SimpleNamespace(**{**fields, name: fields[name] + 1})) != stamp_of(SimpleNamespace(**fields))

    monkeypatch.setenv("PWSELF_CACHE_DIR", str(tmp_path / "cache"))
    base = shrunk_path(tmp_path, "d" * 32, 3, 512)
    assert len({base, shrunk_path(tmp_path, "e" * 32, 3, 512), shrunk_path(tmp_path, "d" * 32, 1, 512),
                shrunk_path(tmp_path, "d" * 32, 3, 640)}) == 4
    photos = tmp_path / "photos"
    photos.mkdir()
    f = write_synthetic_photo(photos / "a.jpg", 800, 600)
    stats = {}
    scan = lambda: scan_images(photos, [f], shrink=(3, 512), stats=stats)  # noqa: E731
    scan()
    first = _stamp(f)
    for change in (lambda: f.write_bytes(f.read_bytes() + b"\0"),  # size
                   lambda: os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9)),  # mtime
                   lambda: os.chmod(f, 0o600),  # ctime alone
                   lambda: (f.rename(photos / "b.jpg"), (photos / "b.jpg").rename(f))):  # a rename keeps nothing
        change()
        assert _stamp(f) != first
        scan()
        assert stats["decoded"] == 1  # read again
        first = _stamp(f)
    scan()
    assert stats["decoded"] == 0


def test_every_element_of_the_feature_cache_key_invalidates(tmp_path):
    from pwself.data.datasets import TensorImageDataset
    from pwself.eval.source import FeatureSource, cached_features

    calls = []

    def encode(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import pwself.eval.source as source_mod

    real = source_mod.extract_features
    source_mod.extract_features = encode
    try:
        torch.manual_seed(0)
        cfg = tiny_config()
        from pwself.models import make_vit

        vit = make_vit(cfg.backbone, 16).eval()
        images = torch.randint(0, 255, (6, 1, 16, 16), dtype=torch.uint8)
        data = TensorImageDataset(images, torch.arange(6) % 2)
        src = FeatureSource("m", vit, [0.5], [0.25], 16, "weights-a")

        def run(source=src, dataset=data, pooling="cls", normalize=True):
            cached_features(source, dataset, {"kind": "t"}, pooling, tmp_path, normalize)

        run()
        run()
        assert len(calls) == 1
        variants = [
            dict(source=FeatureSource("m", vit, [0.5], [0.25], 16, "weights-b")),  # the weights
            dict(source=FeatureSource("m", vit, [0.4], [0.25], 16, "weights-a")),  # the mean
            dict(source=FeatureSource("m", vit, [0.5], [0.3], 16, "weights-a")),  # the std
            dict(source=FeatureSource("m", vit, [0.5], [0.25], 20, "weights-a")),  # the input side
            dict(dataset=TensorImageDataset(images, (torch.arange(6) + 1) % 2)),  # the labels
            dict(dataset=TensorImageDataset(images.flip(0), torch.arange(6) % 2)),  # the pixels
            dict(pooling="mean-patch"), dict(normalize=False),
        ]
        for k, v in enumerate(variants):
            run(**v)
            assert len(calls) == 2 + k, v
    finally:
        source_mod.extract_features = real


# --- every setting reaches the step ---------------------------------------------------------------------------------
# One value each that differs from the default, and the objective under which the key is read.
MUTATIONS = {
    "loss.lam": ("0.2", "pwll"), "loss.student_temp": ("0.2", None), "loss.teacher_temp": ("0.07", None),
    "loss.warmup_teacher_temp": ("0.03", "ttwarm"), "loss.warmup_teacher_temp_epochs": ("2", "ttwarm"),
    "loss.center_momentum": ("0.5", None), "loss.matcher": ("feature-nn", None), "loss.patch_fraction": ("0.5", None),
    "loss.koleo_weight": ("0.1", None), "loss.centering": ("sinkhorn", None), "loss.sinkhorn_iterations": ("1", "sk"),
    "objectives.cossl.weight": ("0.5", "cossl"), "objectives.logo.weight": ("0.5", "logo"),
    "objectives.ibot.weight": ("0.5", "ibot"), "objectives.ibot.mask_probability": ("1.0", "ibot"),
    "objectives.ibot.mask_ratio": ("[0.3,0.5]", "ibot"), "objectives.pwml_ibot.weight": ("0.5", "pwml_ibot"),
    "objectives.pwml_ibot.mask_probability": ("1.0", "pwml_ibot"),
    "objectives.pwml_ibot.mask_ratio": ("[0.3,0.5]", "pwml_ibot"),
    "head.out_dim": ("24", None), "head.hidden_dim": ("24", None), "head.bottleneck_dim": ("12", None),
    "head.n_layers": ("2", None), "head.norm_last_layer": ("false", None), "head.patch_head": ("separate", None),
    "head.patch_out_dim": ("24", "separate"),
    "views.n_global": ("3", None), "views.n_local": ("2", None), "views.global_size": ("20", None),
    "views.local_size": ("12", None), "views.global_scale": ("[0.6,1.0]", None),
    "views.local_scale": ("[0.1,0.3]", None), "views.flip_p": ("0.0", None),
    "photometric.mode": ("image", None), "photometric.jitter_p": ("0.3", None), "photometric.brightness": ("0.1", None),
    "photometric.contrast": ("0.1", None), "photometric.saturation": ("0.6", None), "photometric.hue": ("0.3", None),
    "photometric.grayscale_p": ("0.6", None), "photometric.blur_p": ("0.9", None),
    "photometric.blur_sigma": ("[0.5,2.0]", None), "photometric.solarize_p": ("0.9", None),
    "photometric.noise_p": ("0.9", None), "photometric.noise_std": ("0.3", None),
    "optim.lr": ("1e-3", None), "optim.min_lr": ("1e-4", None), "optim.warmup_epochs": ("0.5", None),
    "optim.weight_decay": ("0.2", None), "optim.weight_decay_end": ("0.01", None), "optim.clip_grad": ("0.01", None),
    "optim.freeze_last_layer_epochs": ("0", None), "optim.momentum_teacher": ("0.9", None),
    "optim.head_warmup_epochs": ("1", None), "optim.layer_decay": ("0.5", None),
}
# Keys of these sections that do not change what one step computes, and why.
NOT_THE_STEP = {
    "loss.objective": "selects the objective: each one is pinned by its own reference and golden run",
    "loss.recompute_head": "the same loss and gradients by design, less memory (test_train pins the equality)",
    "loss.gram_weight": "needs backbone.init: pinned by test_backbones (zero at the start, in the loss)",
    "optim.max_nonfinite_steps": "read by the training loop when losses are not finite (test_faults)",
}
BASE = ["backbone.embed_dim=16", "backbone.depth=2", "backbone.num_heads=2", "backbone.in_chans=3",
        "head.out_dim=16", "head.hidden_dim=16", "head.bottleneck_dim=8", "views.global_size=16",
        "views.local_size=8", "views.n_local=3", "precision=fp64", "optim.lr=0.5", "optim.warmup_epochs=0",
        "optim.freeze_last_layer_epochs=0.5", "epochs=3", "batch_size=4"]
OBJECTIVE_OF = {"pwll": ["loss.objective=pwll"], "cossl": ["loss.objective=cossl"], "logo": ["loss.objective=logo"],
                "ibot": ["loss.objective=ibot"], "pwml_ibot": ["loss.objective=pwml_ibot"],
                "sk": ["loss.centering=sinkhorn"], "separate": ["head.patch_head=separate"],
                "ttwarm": ["loss.warmup_teacher_temp=0.02", "loss.warmup_teacher_temp_epochs=1"]}


def _what_the_step_computes(overrides):
    """Two training steps (schedules applied as training applies them), float64: the loss terms and sums of the
    student, teacher and objective states after them."""
    cfg = load_config(None, [*BASE, *overrides])
    step = build_step(cfg, torch.device("cpu"), [0.5] * 3, [0.25] * 3)
    sch = make_schedules(cfg, steps_per_epoch=2)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    for i in range(2):
        apply_schedules(step.optimizer, sch, i)
        out, _ = step(images, sch.teacher_temp[i], sch.momentum[i], gen)
        seen += [round(float(v.detach()), 12) for _, v in sorted(out.terms.items())]
    for module in (step.model, step.teacher, step.objective):
        seen += [float(sum(t.double().sum() * (k + 1) for k, t in enumerate(module.state_dict().values())))]
    return seen


@pytest.mark.slow
def test_every_setting_of_the_step_reaches_what_the_step_computes():
    shown = config_to_dict(load_config(None, []))  # what `pwself config show` documents
    documented = {f"{section}.{k}" for section in ("loss", "head", "views", "photometric", "optim")
                  for k in shown[section]}
    documented |= {f"objectives.{o}.{k}" for o, keys in shown["objectives"].items() for k in keys}
    assert documented == set(MUTATIONS) | set(NOT_THE_STEP), "a key was added or removed: list it here"
    baselines = {}
    unmoved = []
    for key, (value, context) in MUTATIONS.items():
        ctx = OBJECTIVE_OF.get(context, [])
        if context not in baselines:
            baselines[context] = _what_the_step_computes(ctx)
        if _what_the_step_computes([*ctx, f"{key}={value}"]) == baselines[context]:
            unmoved.append(key)
    assert not unmoved, f"these settings change nothing the step computes: {unmoved}"


# --- run-state decisions through the CLI ----------------------------------------------------------------------------
def test_the_run_state_table_through_the_cli(tmp_path, capsys, monkeypatch):
    """`pretrain --auto-resume` on folders written exactly as a run writes them, one row each: no run (trains),
    stopped before a checkpoint (starts over), a checkpoint (continues from it), knn.json but no finished.json
    (continues: finished.json is written last), finished (shows, trains nothing), other config (refused naming
    the key), other data (refused naming what changed)."""
    import json
    import shutil

    from test_cli import TINY

    import pwself.train as train_mod

    args = ["pretrain", "--batch-size", "32", "--epochs", "1", "--no-progress", "--auto-resume", *TINY,
            "eval.knn_floors=false", "keep_checkpoints=0", "checkpoint_every_steps=1"]
    ref = tmp_path / "ref"
    assert main([*args, "--out-dir", str(ref)]) == 0  # 96 images / 32: 3 steps, a checkpoint after each
    steps_trained = []
    real = train_mod.TrainStep.__call__

    def counting(self, *a, **k):
        steps_trained.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod.TrainStep, "__call__", counting)

    def again(folder, *extra):
        steps_trained.clear()
        capsys.readouterr()
        rc = main([*args, "--out-dir", str(folder), *extra])
        return rc, len(steps_trained), capsys.readouterr()

    rows = {}
    rows["no run"] = tmp_path / "new"
    rows["before a checkpoint"] = tmp_path / "early"
    rows["a checkpoint"] = tmp_path / "mid"
    rows["knn.json, no finished.json"] = tmp_path / "late"
    rows["finished"] = tmp_path / "done"
    for name in ("early", "mid", "late", "done"):
        shutil.copytree(ref, tmp_path / name)
    for p in (tmp_path / "early").glob("checkpoint*.pt"):
        p.unlink()
    for folder in (tmp_path / "early", tmp_path / "mid", tmp_path / "late"):
        (folder / "finished.json").unlink()
    for p in (tmp_path / "mid").glob("checkpoint_0000000[23].pt"):
        p.unlink()
    (tmp_path / "mid" / "checkpoint_last.pt").unlink(missing_ok=True)
    (tmp_path / "mid" / "knn.json").unlink()

    assert again(rows["no run"])[:2] == (0, 3)
    assert again(rows["before a checkpoint"])[:2] == (0, 3)  # nothing to lose: started over
    assert again(rows["a checkpoint"])[:2] == (0, 2)  # continued after step 1
    assert again(rows["knn.json, no finished.json"])[:2] == (0, 0)  # every step done; finished now
    assert (tmp_path / "late" / "finished.json").exists()
    rc, n, printed = again(rows["finished"])
    assert (rc, n) == (0, 0) and "finished at step 3: its stored result" in printed.out
    rc, n, printed = again(rows["finished"], "seed=7")
    assert (rc, n) == (2, 0) and "holds a run of another config (it differs in seed)" in printed.err
    other_data = tmp_path / "other_data"  # a checkpoint, then the same config on other images
    shutil.copytree(tmp_path / "mid", other_data, ignore=shutil.ignore_patterns("checkpoint_0000000[23].pt"))
    for p in other_data.glob("checkpoint_0000000[23].pt"):
        p.unlink()
    (other_data / "finished.json").unlink(missing_ok=True)
    monkeypatch.setattr("pwself.data.fingerprint", lambda dataset: "other images")  # what the run reads first
    rc, n, printed = again(other_data)
    assert (rc, n) == (2, 0) and "changed since the run started" in printed.err
    assert json.loads((tmp_path / "done" / "finished.json").read_text())["step"] == 3
