"""Fault suite: what a hostile user or a bad day does to a run (an occupied folder, two runs at once, a cut
file, a full disk, a divergence, nonsense values, a corrupt checkpoint), and what must hold afterwards."""

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY, _run

from pwself.cli import main
from pwself.run.checkpoint import load_checkpoint
from pwself.run.folder import RunLock

QUIET = ["eval.knn_at_end=false", "eval.knn_floors=false"]


def _err(capsys):
    """The error line a failed command printed (its last stderr line: earlier ones are the run's notices)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".pwself.lock"}


# 1. A new run in a folder that holds a run: refused, nothing touched; --overwrite moves it aside.
def test_a_new_run_never_writes_over_an_old_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    before = _snapshot(out)
    assert _run(out, "--epochs", "1", *QUIET, "seed=5") == 2
    err = _err(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before  # byte-identical
    assert _run(out, "--epochs", "1", "--overwrite", *QUIET, "seed=5") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == before  # the old run, whole, beside the new one
    assert load_checkpoint(out)["config"]["seed"] == 5


# 2. Two runs in one folder at once: the second is refused, naming the first one's PID.
def test_a_concurrent_run_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        assert _run(out, "--epochs", "1", *QUIET) == 2
        err = _err(capsys)
        assert f"in use by another pwself run (PID {os.getpid()})" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        lock.release()
    assert _run(out, "--epochs", "1", *QUIET) == 0  # free again once the holder is gone


# 3. A truncated JPEG is named at start, before step 1; a file that breaks later is one line from a worker.
def _jpeg_folder(root, n=4):
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{k}.jpg", quality=90)


FOLDER = ["data.kind=folder", "data.image_size=16", "backbone.in_chans=3", "views.global_size=16",
          "views.local_size=8", "views.n_local=2", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
          "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16", *QUIET]


def test_a_truncated_jpeg_is_named_before_training(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg_folder(root)
    data = (root / "img2.jpg").read_bytes()
    (root / "img2.jpg").write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    out = tmp_path / "run"
    argv = ["pretrain", "--out-dir", str(out), "--epochs", "1", "--batch-size", "2", "--no-progress",
            f"data.root={root}", *FOLDER]
    assert main(argv) == 2
    err = _err(capsys)
    assert "img2.jpg" in err and "truncated" in err and "data.on_bad_image=skip" in err
    assert not (out / "metrics.jsonl").exists()  # refused before step 1


def test_the_folder_scan_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import pwself.data.datasets as datasets

    _jpeg_folder(tmp_path)
    calls = []
    real = datasets._decode_check
    monkeypatch.setattr(datasets, "_decode_check", lambda p, *rest: calls.append(p.name) or real(p, *rest))
    datasets.ImageFolderDataset(tmp_path, 16)
    assert len(calls) == 4
    datasets.ImageFolderDataset(tmp_path, 16)
    assert len(calls) == 4  # a restart does not decode again
    os.utime(tmp_path / "img1.jpg", ns=(1, 1))
    datasets.ImageFolderDataset(tmp_path, 16)
    assert calls[4:] == ["img1.jpg"]  # a changed file is checked again


def test_an_error_inside_a_loader_worker_is_one_line(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg_folder(root)
    from pwself.data import ImageFolderDataset, iterate_batches

    ds = ImageFolderDataset(root, 16)  # scanned as good
    bad = root / "img3.jpg"
    st = bad.stat()
    bad.write_bytes(b"\xff\xd8" + b"\x00" * (st.st_size - 2))  # broken after the scan, while the run reads
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    from pwself.data import DatasetError

    with pytest.raises(DatasetError, match="img3.jpg"):  # a new scan sees it (ctime), whatever size and mtime say
        ImageFolderDataset(root, 16)

    with pytest.raises(DatasetError) as info:
        list(iterate_batches(ds, [torch.arange(4)], num_workers=1))
    assert "img3.jpg" in str(info.value) and len(str(info.value).splitlines()) == 1


# 4. A full disk at a checkpoint: one line naming the folder and the free space, no partial file left;
#    a torn metrics line does not block --resume.
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import pwself.run.checkpoint as checkpoint

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "full"
    assert _run(out, "--epochs", "1", *QUIET) == 2
    err = _err(capsys)
    assert "No space left on device" in err and str(out) in err and " free)" in err
    assert not list(out.glob("*.tmp"))


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    out = tmp_path / "torn"
    assert _run(out, "--epochs", "2", *QUIET) == 0
    (out / "checkpoint_00000006.pt").unlink()
    (out / "checkpoint_last.pt").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # a write cut off by a kill
    with caplog.at_level("WARNING", logger="pwself"):
        assert _run(out, "--epochs", "2", "--resume", *QUIET) == 0
    assert any("is torn" in r.getMessage() for r in caplog.records)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


# 5. Divergence: the fix a user needs is accepted on --resume, and said.
def _stopped_after_epoch_one(out):
    """A 2-epoch run whose last checkpoint is epoch 1's (as if it had stopped there)."""
    assert _run(out, "--epochs", "2", *QUIET) == 0
    (out / "checkpoint_00000006.pt").unlink()
    (out / "checkpoint_last.pt").unlink()
    return out


def test_resume_accepts_a_lower_learning_rate_and_says_so(tmp_path, caplog):
    out = _stopped_after_epoch_one(tmp_path / "div")
    with caplog.at_level("WARNING", logger="pwself"):
        assert _run(out, "--epochs", "2", "--resume", *QUIET, "optim.lr=1e-5", "optim.clip_grad=1.0") == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "resuming with optim.lr=1e-05" in said and "resuming with optim.clip_grad=1.0" in said
    assert load_checkpoint(out)["config"]["optim"]["lr"] == 1e-5


def test_no_checkpoint_is_written_during_a_non_finite_streak(tmp_path, monkeypatch):
    from test_reliability import _nan_at

    _nan_at(monkeypatch, {2, 3, 4})  # steps 3-5: the end of epoch 1 falls inside the streak
    out = tmp_path / "streak"
    assert _run(out, "--epochs", "2", "optim.max_nonfinite_steps=5", *QUIET) == 0
    assert not (out / "checkpoint_00000003.pt").exists()  # the weights of the streak were never saved
    assert load_checkpoint(out)["step"] == 6 and load_checkpoint(out)["skipped_steps"] == 3


# 6. Values that cannot work: one line each, no traceback, nothing written.
@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr=-1.0 is out of range: it must be > 0"),
    ("optim.lr=nan", "optim.lr=nan is out of range"),
    ("loss.teacher_temp=0", "loss.teacher_temp=0.0 is out of range"),
    ("loss.teacher_temp=-1", "loss.teacher_temp=-1.0 is out of range"),
    ("loss.student_temp=0", "loss.student_temp=0.0 is out of range"),
    ("loss.center_momentum=2", "loss.center_momentum=2.0 is out of range: it must be in [0, 1]"),
    ("optim.momentum_teacher=5", "optim.momentum_teacher=5.0 is out of range"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 is out of range: it must be >= 0"),
    ("views.flip_p=2", "views.flip_p=2.0 is out of range"),
    ("views.global_scale=[1.0,0.4]", "views.global_scale=[1.0, 0.4] must be [low, high]"),
    ("backbone.patch_size=0", "backbone.patch_size=0 is out of range"),
    ("backbone.num_heads=0", "backbone.num_heads=0 is out of range"),
    ("backbone.embed_dim=0", "backbone.embed_dim=0 is out of range"),
    ("data.image_size=0", "data.image_size=0 is out of range"),
    ("log_every=0", "log_every=0 is out of range"),
    ("head.out_dim=0", "head.out_dim=0 is out of range"),
    ("device=cuda", "no CUDA GPU is visible here"),
    ("backbone.init=/no/such/weights.pth", "backbone.init=/no/such/weights.pth does not exist"),
    ("head.patch_head=own", "head.patch_head='own': use shared, separate or split"),
    ("backbone.name=vit_nonexistent", "is not a timm model"),
])
def test_invalid_values_are_one_line(tmp_path, capsys, override, message):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert _run(tmp_path / "bad", "--epochs", "1", *QUIET, override) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_bad_files_and_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("optim:\n  lr: [1, 2\n")
    cases = [
        (["pretrain", "--config", str(tmp_path / "broken.yaml")], "is not valid YAML at line"),
        (["pretrain", "--config", str(tmp_path)], "is a folder: pass a YAML file"),
        (["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "no" / "such" / "x.safetensors")],
         "does not exist"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((["pretrain", "--out-dir", str(tmp_path / "file"), "--epochs", "1", *TINY], "is a file, not a folder"))
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(ro, os.W_OK):  # root writes anywhere: nothing to check then
        cases.append((["pretrain", "--out-dir", str(ro / "run"), "--epochs", "1", *TINY], "cannot create --out-dir"))
    torch.save({"just": torch.zeros(2)}, tmp_path / "foreign.pt")
    cases.append((["export", str(tmp_path / "foreign.pt")], "loads but is not a pwself checkpoint"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_an_export_into_a_missing_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--output", str(tmp_path / "missing" / "bb.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "folder" in err and "missing" in err and len(err.splitlines()) == 1


def test_a_corrupt_feature_cache_is_recomputed(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    cache = tmp_path / "cache"
    argv = ["eval-knn", str(out), "--ks", "10", "--no-progress", "--cache-dir", str(cache), "--output",
            str(tmp_path / "k")]
    assert main(argv) == 0
    first = json.loads((tmp_path / "k.json").read_text())
    for f in cache.glob("features_*.pt"):
        f.write_bytes(b"not a tensor file")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "k.json").read_text())["knn"] == first["knn"]


# 7. A corrupt newest checkpoint: --resume falls back to the newest intact one and says so.
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    out = tmp_path / "corrupt"
    assert _run(out, "--epochs", "2", *QUIET) == 0
    straight = load_checkpoint(out / "checkpoint_00000006.pt")
    (out / "checkpoint_00000006.pt").write_bytes(b"\x00" * 100)  # torn by a crash of the disk, not of pwself
    with caplog.at_level("WARNING", logger="pwself"):
        assert _run(out, "--epochs", "2", "--resume", *QUIET) == 0
    assert any("checkpoint_00000006.pt" in r.getMessage() and "checkpoint_00000003.pt" in r.getMessage()
               for r in caplog.records)
    again = load_checkpoint(out / "checkpoint_00000006.pt")
    for name, value in straight["teacher"].items():
        assert torch.equal(value, again["teacher"][name]), name  # the same run, continued exactly


# 8. Small things: file modes, NaN in metrics, odd file names, other epochs on resume.
def test_exports_are_world_readable_like_checkpoints_and_nan_is_null(tmp_path, monkeypatch):
    from test_reliability import _nan_at

    _nan_at(monkeypatch, {1})
    out = tmp_path / "modes"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    mode = stat.S_IMODE((out / "teacher_backbone.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((out / "checkpoint_00000003.pt").stat().st_mode)
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = [json.loads(x) for x in text.splitlines()]  # strict JSON
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path):
    from pwself.data import DatasetError, ImageFolderDataset

    _jpeg_folder(tmp_path, n=2)
    (tmp_path / "bad\nname.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(tmp_path, 16)
    assert len(str(info.value).splitlines()) == 1 and "bad\\nname.jpg" in str(info.value)


def test_other_epochs_on_resume_are_refused(tmp_path, capsys):
    out = tmp_path / "ep"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    capsys.readouterr()
    assert _run(out, "--epochs", "3", "--resume", *QUIET) == 2
    assert "config differs in epochs" in _err(capsys)


# Issue 25 (trusted results). 25.1: make-scenes --overwrite moves what was there aside, never deletes it.
def test_make_scenes_overwrite_moves_a_users_folder_aside(tmp_path, fake_fmnist):
    from pwself.data.scenes import SceneSpec, make_scenes

    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"a user's photo")
    make_scenes(out, SceneSpec(size=28, n_train=2, n_test=2, item_size=(10, 14)), str(fake_fmnist), progress=False,
                overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(aside) == 1 and (aside[0] / "holiday.jpg").read_bytes() == b"a user's photo"
    assert (out / "classes.json").exists()


# 25.2: export never replaces a file without --overwrite, never writes onto its input or a run's own files.
def test_export_refuses_to_replace_files_and_never_touches_a_run(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _run(run, "--epochs", "1", *QUIET) == 0
    before = _snapshot(run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("the project's readme")
    assert main(["export", str(run), "--format", "folder", "."]) == 2
    assert "README.md exists: choose another path or pass --overwrite" in _err(capsys)
    assert (tmp_path / "README.md").read_text() == "the project's readme"
    ckpt = sorted(run.glob("checkpoint_*.pt"))[-1]
    for cmd, message in (
        (["export", str(run), "--format", "safetensors", str(ckpt), "--overwrite"], "is the input itself"),
        (["export", str(run), "--output", str(run / "teacher_backbone.safetensors"), "--overwrite"],
         "would replace a file of the run"),
        (["export", str(run), "--output", str(run / "dense_history.jsonl"), "--overwrite"],
         "would replace a file of the run"),
        (["export", str(run), "--output", str(run / "matches_0.png"), "--overwrite"],
         "would replace a file of the run"),
        (["export", str(run), "--format", "folder", str(run), "--overwrite"], "holds a run"),
    ):
        assert main(cmd) == 2
        assert message in _err(capsys)
    assert _snapshot(run) == before
    assert main(["export", str(run)]) == 0  # the default name is the run's export, not its own backbone file
    assert main(["export", str(run)]) == 2 and "--overwrite" in _err(capsys)
    assert main(["export", str(run), "--overwrite"]) == 0
    assert main(["pretrain", "--out-dir", str(run), "--resume", "--epochs", "1", "--batch-size", "32",
                 "--no-progress", *TINY, *QUIET]) == 0  # the run still resumes (finished: nothing to do)


# 25.3: evaluation output never replaces a run's files.
def test_evaluation_output_never_replaces_a_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, "--epochs", "1", "eval.knn_floors=false") == 0
    knn = (run / "knn.json").read_bytes()
    assert main(["eval-knn", str(run), "--output", str(run / "knn")]) == 2
    assert "would replace a file of the run" in _err(capsys)
    assert main(["viz-curves", str(run), "--output", str(run / "training_curves.png")]) == 2
    assert (run / "knn.json").read_bytes() == knn


# 25.4: the data is checked before anything is moved; data and run folder never nest.
def test_data_is_checked_before_a_run_folder_is_moved_and_never_nests(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "imgs").mkdir(parents=True)
    _jpeg_folder(proj / "imgs")
    (proj / "config.yaml").write_text("seed: 1\n")  # proj looks like an old run's folder
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _run(proj, "--overwrite", *FOLDER, f"data.root={proj / 'gone'}") == 2
    err = _err(capsys)
    assert err.startswith("pwself pretrain: error: data.root=") and "gone does not exist" in err
    assert _run(proj, "--overwrite", *FOLDER, f"data.root={proj / 'imgs'}") == 2
    assert "is inside --out-dir" in _err(capsys)
    assert _run(proj / "imgs" / "run", *FOLDER, f"data.root={proj / 'imgs'}") == 2
    assert "is inside data.root" in _err(capsys)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing moved or written


# 25.14: a run stopped before its first checkpoint is no dead end.
def test_a_run_folder_without_a_checkpoint_starts_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 3\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "notes.txt").write_text("mine")
    assert _run(out, "--epochs", "1", *QUIET) == 0
    assert "stopped before its first checkpoint: starting over" in caplog.text
    assert (out / "notes.txt").read_text() == "mine" and load_checkpoint(out)["config"]["seed"] == 0


# 25.15 and 39.17: Ctrl-C says what continues the work, in the command's own terms: for pretrain the whole
# command with --auto-resume (--resume would fail before the first checkpoint; --out-dir kept).
@pytest.mark.parametrize("argv,hint", [
    (["eval-knn", "vit_tiny_patch16_224"], "run the same command again to continue"),
    (["pretrain", "--out-dir", "x"], "continue with `pwself pretrain --out-dir x --auto-resume`"),
    (["pretrain", "--out-dir", "x", "--resume"], "continue with `pwself pretrain --out-dir x --auto-resume`"),
    (["pretrain", "--out-dir", "x", "--auto-resume"], "continue with `pwself pretrain --out-dir x --auto-resume`"),
])
def test_an_interrupt_names_what_continues_the_work(argv, hint, capsys, monkeypatch, tmp_path):
    import pwself.cli as cli

    monkeypatch.chdir(tmp_path)

    def interrupted(args):
        raise KeyboardInterrupt

    from dataclasses import replace

    monkeypatch.setattr(cli, "COMMANDS", tuple(replace(c, handler=interrupted) for c in cli.COMMANDS))
    monkeypatch.setattr(cli, "cmd_eval", interrupted)  # the eval-NAME commands, made from the protocol registry
    assert main(argv) == 130
    assert hint in capsys.readouterr().err


# 25.5: a cached run, trial or table of other settings is never shown as new.
@pytest.mark.slow
def test_compare_and_tune_refuse_cached_runs_of_other_settings(tmp_path, capsys, monkeypatch):
    args = ["compare", "--objectives", "dino", "--seeds", "0", "--out-dir", str(tmp_path / "cmp"), "--no-progress",
            *TINY, "epochs=1", "batch_size=32", "eval.knn_floors=false"]
    assert main(args) == 0
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["config"]["epochs"] == 1
    assert main([*args, "epochs=2", "head.out_dim=32"]) == 2
    err = _err(capsys)
    assert "dino_seed0 holds a run of another config (it differs in epochs, head.out_dim)" in err
    tune = ["tune", "--objective", "dino", "--trials", "1", "--no-progress", "--out-dir", str(tmp_path / "tune"),
            *TINY, "epochs=1", "batch_size=32", "loss.teacher_temp=0.04,0.05", "optim.lr=1e-3"]
    assert main(tune) == 0
    tune[-1] = "optim.lr=2e-3"
    assert main(tune) == 2
    assert "trial_0 holds a run of another config (it differs in optim.lr)" in _err(capsys)


# 25.9: every evaluation flag is checked before any work.
@pytest.mark.parametrize("flags,message", [
    (["--temperature", "0"], "--temperature 0.0: use a finite value > 0"),
    (["--temperature", "nan"], "--temperature nan: use a finite value > 0"),
    (["--ks", "0"], "--ks '0': give whole numbers >= 1"),
    (["--ks", "-5"], "--ks '-5': give whole numbers >= 1"),
    (["--ks", "ten"], "--ks 'ten': give whole numbers >= 1"),
])
def test_bad_knn_flags_are_one_line_before_any_work(flags, message, capsys, monkeypatch):
    import pwself.eval.suite as suite

    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval-knn", "vit_tiny_patch16_224", *flags]) == 2
    assert message in _err(capsys)


def test_bad_probe_flags_and_empty_objectives_are_one_line(tmp_path, capsys, monkeypatch):
    import pwself.eval.suite as suite

    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval-linear", "vit_tiny_patch16_224", "--epochs", "0"]) == 2
    assert "--epochs 0: use at least 1" in _err(capsys)
    assert main(["compare", "--objectives", "", "--out-dir", str(tmp_path / "c"), *TINY]) == 2
    assert "names no objective" in _err(capsys) and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_knn_larger_than_the_bank_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, "--epochs", "1", *QUIET) == 0
    assert main(["eval-knn", str(run), "--ks", "1000", "--cache-dir", ""]) == 2
    assert "every k is larger than the train bank (96 images): use k <= 96" in _err(capsys)


# 25.17: every compare entry and tune value is checked before anything trains.
@pytest.mark.parametrize("argv,message", [
    (["compare", "--objectives", "dino,foo"], "loss.objective='foo'"),
    (["compare", "--objectives", "dino,pwml:optim.lr=-1"], "--objectives entry 'pwml:optim.lr=-1': optim.lr=-1"),
    (["compare", "--objectives", "dino,pwml:no.such=1"], "no.such"),
    (["tune", "--objective", "dino", "--trials", "2", "optim.lr=1e-3,-1"], "optim.lr=-1"),
])
def test_every_entry_is_checked_before_anything_trains(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pwself.train.train", lambda *a, **k: pytest.fail("trained before checking every entry"))
    assert main([*argv, "--out-dir", str(tmp_path / "o"), "--no-progress", *TINY]) == 2
    assert message in _err(capsys)


# 25.20: a second --runs-only worker moves on to the runs not yet taken.
def test_a_runs_only_worker_skips_a_run_another_worker_holds(tmp_path, monkeypatch, capsys):
    import pwself.compare as compare_mod
    from pwself.run.folder import RunLock

    out = tmp_path / "cmp"
    (out / "dino_seed0").mkdir(parents=True)
    lock = RunLock(out / "dino_seed0")
    lock.acquire()  # the first worker's run, in progress
    done = []
    real = compare_mod._run_one

    def run_one(cfg, *a, **k):
        if "dino_seed0" not in str(cfg.out_dir):
            done.append(cfg.out_dir)
            return {"knn10": 1.0, "knn20": 1.0, "linear": 1.0}
        return real(cfg, *a, **k)

    monkeypatch.setattr(compare_mod, "_run_one", run_one)
    try:
        assert main(["compare", "--objectives", "dino", "--seeds", "0,1", "--out-dir", str(out), "--runs-only",
                     "--no-progress", *TINY]) == 0
    finally:
        lock.release()
    assert [str(p) for p in done] == [str(out / "dino_seed1")]


# 25.10: a resume may only move a divergence fix in its safe direction; orderings are checked on every run.
@pytest.mark.slow
def test_resume_refuses_unsafe_changes_and_bad_orderings_are_refused(tmp_path, capsys):
    out = _stopped_after_epoch_one(tmp_path / "run")
    for change, message in (("optim.lr=1e-2", "may only lower it"), ("optim.min_lr=1e-4", "may only lower it"),
                            ("optim.clip_grad=0", "keep clipping on"), ("optim.clip_grad=30", "may only lower it"),
                            ("loss.teacher_temp=0.01", "may only raise it")):
        assert _run(out, "--epochs", "2", "--resume", *QUIET, change) == 2, change
        assert message in _err(capsys), change
    for bad, message in (("optim.min_lr=1", "optim.min_lr=1.0 is above optim.lr"),
                         ("photometric.blur_sigma=[1,0.1]", "photometric.blur_sigma=[1.0, 0.1] must be")):
        assert _run(tmp_path / "new", "--epochs", "1", *QUIET, bad) == 2
        assert message in _err(capsys)


# 25.16: damaged or foreign weight and config files are one line naming the file.
def test_damaged_exports_and_configs_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, "--epochs", "1", *QUIET) == 0
    kept = tmp_path / "kept"  # a run kept without its checkpoints
    kept.mkdir()
    for name in ("config.yaml", "teacher_backbone.safetensors"):
        (kept / name).write_bytes((run / name).read_bytes())
    (kept / "teacher_backbone.safetensors").write_bytes(b"\x00" * 64)
    assert main(["eval-knn", str(kept)]) == 2
    assert "teacher_backbone.safetensors is damaged" in _err(capsys)
    assert main(["pretrain", "--out-dir", str(tmp_path / "x"), "--no-progress", *TINY, *QUIET,
                 f"backbone.init={kept / 'teacher_backbone.safetensors'}"]) == 2
    assert "cannot be read as safetensors" in _err(capsys)
    (kept / "teacher_backbone.safetensors").write_bytes((run / "teacher_backbone.safetensors").read_bytes())
    (kept / "config.yaml").write_text((run / "config.yaml").read_text().replace("embed_dim: 32", "embed_dim: 64"))
    assert main(["eval-knn", str(kept)]) == 2
    assert "does not fit the run's config.yaml" in _err(capsys)
    (kept / "config.yaml").write_text("data: [unclosed\n")
    assert main(["eval-knn", str(kept)]) == 2
    assert "config.yaml cannot be read" in _err(capsys)


# 25.18: --resume reads the run's own config.yaml: only the keys given are compared.
@pytest.mark.slow
def test_resume_without_repeating_the_config(tmp_path, capsys):
    out = _stopped_after_epoch_one(tmp_path / "run")
    assert main(["pretrain", "--out-dir", str(out), "--resume", "--no-progress"]) == 0  # as the README shows it
    assert load_checkpoint(out)["step"] == 6
    assert main(["pretrain", "--out-dir", str(out), "--resume", "--no-progress", "seed=4"]) == 2
    assert "config differs in seed" in _err(capsys)


def _class_folders(root, classes, n=3, size=20, seed=0):
    """``root/<class>/k.png`` grayscale images whose brightness is the class (kNN separates them perfectly)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            arr = torch.full((size, size), 40 + 60 * ("abc".index(name[0]) if name[0] in "abc" else 3)).to(torch.uint8)
            arr[k % size, :] = 255
            Image.fromarray(arr.numpy(), mode="L").save(root / name / f"{k}.png")


# 25.7: an evaluation split numbers its labels by the training split's class names.
def test_a_val_split_missing_a_class_keeps_the_training_labels(tmp_path, caplog):
    from pwself.data import build_dataset

    _class_folders(tmp_path / "train", ["a", "b", "c"])
    _class_folders(tmp_path / "val", ["a", "c"])  # no b: c must stay label 2, not become 1
    val = build_dataset("folder", str(tmp_path), "test", image_size=16, channels=1)
    assert val.classes == ["a", "b", "c"] and sorted(set(val.labels.tolist())) == [0, 2]
    assert "has no image of class(es) b of the training split" in caplog.text
    _class_folders(tmp_path / "val", ["d"])
    with pytest.raises(Exception, match="class folder\\(s\\) d that the training split lacks"):
        build_dataset("folder", str(tmp_path), "test", image_size=16, channels=1)


@pytest.mark.slow
def test_knn_with_a_class_missing_from_val_is_right(tmp_path, capsys):
    _class_folders(tmp_path / "data" / "train", ["a", "b", "c"], n=8)
    _class_folders(tmp_path / "data" / "val", ["a", "c"], n=2)
    from pwself.data import build_dataset
    from pwself.eval.knn import knn_classify

    train = build_dataset("folder", str(tmp_path / "data"), "train", image_size=16, channels=1)
    val = build_dataset("folder", str(tmp_path / "data"), "test", image_size=16, channels=1)
    feats = [torch.nn.functional.normalize(torch.stack([d[i][0].float().flatten() for i in range(len(d))]), dim=1)
             for d in (train, val)]
    res = knn_classify(feats[0], train.labels, feats[1], val.labels, ks=[1])
    assert res[1]["top1"] == 100.0  # it said 50 when val numbered its classes itself


# 25.12: a broken image in the evaluation split is named before training starts.
def test_a_truncated_val_image_is_named_before_step_one(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    _class_folders(root / "train", ["a", "b"], n=4)
    _class_folders(root / "val", ["a", "b"], n=2)
    data = (root / "val" / "b" / "1.png").read_bytes()
    (root / "val" / "b" / "1.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr("pwself.train._train", lambda *a, **k: pytest.fail("trained before the check"))
    folder = [f for f in FOLDER if f not in QUIET and "in_chans" not in f]
    assert _run(tmp_path / "run", "--epochs", "1", "--batch-size", "4", *folder, "backbone.in_chans=1",
                f"data.root={root}", "eval.knn_floors=false") == 2
    assert "val/b/1.png" in _err(capsys)


# 25.19: a folder of grayscale images evaluated with a 1-channel timm model reads the folder with 1 channel.
def test_eval_reads_a_folder_with_the_channels_asked_for(tmp_path, capsys):
    _class_folders(tmp_path / "data" / "train", ["a", "b"], n=6, size=32)
    _class_folders(tmp_path / "data" / "val", ["a", "b"], n=2, size=32)
    assert main(["eval-knn", "vit_tiny_patch16_224", "--data-kind", "folder", "--data-root", str(tmp_path / "data"),
                 "--in-chans", "1", "--ks", "3", "--cache-dir", "", "--no-progress"]) == 0
    assert "vit_tiny_patch16_224" in capsys.readouterr().out


# 25.11: the checkpoint named after a divergence holds weights from before it.
@pytest.mark.slow
def test_the_last_good_checkpoint_is_from_before_the_weights_exploded(tmp_path, capsys, caplog):
    out = tmp_path / "boom"
    assert _run(out, "--epochs", "3", "checkpoint_every_steps=1", "optim.lr=1e3", "optim.clip_grad=0",
                "optim.warmup_epochs=1", "optim.max_nonfinite_steps=0", "keep_checkpoints=0", *QUIET) == 2
    err = _err(capsys)
    assert "resume from the last good checkpoint" in err
    named = err.split("checkpoint, ")[1].split(", with --resume")[0]
    ckpt = load_checkpoint(named)
    norm = torch.linalg.vector_norm(torch.stack([v.float().norm() for v in ckpt["student"].values()]))
    assert torch.isfinite(norm) and norm <= 10 * ckpt["weight_norm_ref"]
    steps = sorted(int(p.stem.split("_")[1]) for p in out.glob("checkpoint_0*.pt"))
    assert steps[-1] == ckpt["step"]  # no exploded checkpoint was written after it
    assert "no checkpoint while the weights are" in caplog.text  # finite but exploded steps came after it


# 25.8: resume refuses other training data, naming what changed.
@pytest.mark.slow
def test_resume_refuses_changed_training_data(tmp_path, capsys):
    root = tmp_path / "data"
    _class_folders(root / "train", ["a", "b"], n=8)
    folder = [f for f in FOLDER if "in_chans" not in f]
    args = ["--epochs", "2", "--batch-size", "4", *folder, "backbone.in_chans=1", f"data.root={root}"]
    out = tmp_path / "run"
    assert _run(out, *args) == 0
    (out / "checkpoint_00000008.pt").unlink()
    (out / "checkpoint_last.pt").unlink()
    _class_folders(root / "train", ["c"], n=4)  # 4 more images
    assert _run(out, "--resume", *args) == 2
    assert "the training data now has 20 images, the run had 16" in _err(capsys)
    import shutil

    shutil.rmtree(root / "train" / "c")
    a, b = root / "train" / "a", root / "train" / "b"
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)  # classes swapped: same count
    assert _run(out, "--resume", *args) == 2
    assert "images or labels under data.root=" in _err(capsys)


# 25.6: caches are keyed by content: swapped class folders or edited masks are computed again.
@pytest.mark.slow
def test_feature_cache_follows_the_files_not_their_names(tmp_path, capsys):
    root = tmp_path / "data"
    _class_folders(root / "train", ["a", "b"], n=6, size=32)
    _class_folders(root / "val", ["a", "b"], n=3, size=32)
    args = ["eval-knn", "vit_tiny_patch16_224", "--data-kind", "folder", "--data-root", str(root), "--in-chans", "1",
            "--ks", "1", "--no-progress", "--output", str(tmp_path / "k"), "--overwrite"]

    def top1(*extra):
        assert main([*args, *extra]) == 0
        capsys.readouterr()
        return next(iter(json.loads((tmp_path / "k.json").read_text())["knn"]["cls"].values()))["1"]["top1"]

    cache = ["--cache-dir", str(tmp_path / "cache")]
    before = top1(*cache)
    a, b = root / "val" / "a", root / "val" / "b"
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    assert top1(*cache) == top1("--cache-dir", "") != before


def test_dense_cache_key_follows_an_edited_mask(tmp_path, fake_fmnist):
    import time

    from pwself.data import fingerprint
    from pwself.data.dense import open_dense
    from pwself.data.scenes import SceneSpec, make_scenes

    out = tmp_path / "s"
    make_scenes(out, SceneSpec(size=28, n_train=4, n_test=2, item_size=(10, 14)), str(fake_fmnist), progress=False)
    before = fingerprint(open_dense(out, "test", 1, 28))
    mask = out / "test" / "masks" / "000000.png"
    time.sleep(0.01)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(mask)
    assert fingerprint(open_dense(out, "test", 1, 28)) != before


# 25.13: a full disk outside checkpoints names the file and its filesystem's free space, and leaves no empty file.
def test_a_full_disk_at_a_metrics_line_or_a_figure_names_the_file(tmp_path, capsys, monkeypatch):
    import builtins

    import matplotlib.figure

    import pwself.loggers as loggers

    def no_space_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        if "a" in mode and str(path).endswith("metrics.jsonl"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(loggers, "open", no_space_open, raising=False)
    out = tmp_path / "a"
    assert _run(out, "--epochs", "1", *QUIET) == 2
    err = _err(capsys)
    assert f"cannot write {out / 'metrics.jsonl'} (No space left on device;" in err and f"free in {out})" in err
    monkeypatch.undo()

    def full_savefig(self, path, *a, **k):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_savefig)
    out = tmp_path / "b"
    assert _run(out, "--epochs", "1", *QUIET) == 2
    assert "training_curves.png (No space left on device" in _err(capsys)
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp"))


def test_a_truncated_image_in_a_dense_dataset_is_named(tmp_path, fake_fmnist, capsys):
    from pwself.data.scenes import SceneSpec, make_scenes

    out = tmp_path / "s"
    make_scenes(out, SceneSpec(size=28, n_train=4, n_test=2, item_size=(10, 14)), str(fake_fmnist), progress=False)
    image = out / "test" / "images" / "000001.png"
    image.write_bytes(image.read_bytes()[:60])
    assert main(["eval-dense", "vit_tiny_patch16_224", "--data", str(out), "--in-chans", "1", "--size", "32",
                 "--cache-dir", "", "--no-progress", "--epochs", "1"]) == 2
    assert "cannot decode image" in (err := _err(capsys)) and "000001.png" in err
