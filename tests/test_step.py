"""The training step as training builds it: deterministic teacher, the caller's config untouched, the objective
registry as the one list of names, and old checkpoints brought to the current layout."""

import pytest
import torch
from test_cli import TINY
from test_train import tiny_config

from pwself.config import ConfigError, config_from_dict, config_to_dict, load_config
from pwself.run.checkpoint import load_checkpoint, upgrade_checkpoint
from pwself.step import build_step


def _images(n=4, size=16):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_teacher_is_deterministic_with_drop_path_while_the_student_drops_paths():
    cfg = tiny_config(**{"backbone.drop_path_rate": 0.5})
    step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
    x = _images()
    assert not step.teacher.training and step.model.training
    with torch.no_grad():
        t1, t2 = (step.teacher.encode([x])[0].cls for _ in range(2))
        s1, s2 = (step.model.encode([x])[0].cls for _ in range(2))
    assert torch.equal(t1, t2)
    assert not torch.equal(s1, s2)  # stochastic depth is active in the student only


def test_train_leaves_the_callers_config_alone_and_reports_the_measured_statistics(tmp_path):
    from pwself.train import train

    cfg = load_config(None, [t for t in TINY if "=" in t] + [f"out_dir={tmp_path / 'r'}", "epochs=1",
                                                          "batch_size=32", "eval.knn_at_end=false"])
    before = config_to_dict(cfg)
    result = train(cfg, progress=False)
    assert config_to_dict(cfg) == before and cfg.data.mean == []
    assert result.config.data.mean and result.config.data.std
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.data.mean == result.config.data.mean


def test_a_new_objective_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    import pwself.objectives as objectives
    from pwself.objectives.base import Objective
    from pwself.train import train

    class CLSOnlyTwice(Objective):  # DINO with twice the CLS weight: nothing else to write
        def term_weights(self, n_patch):
            a, c = super().term_weights(n_patch)
            return 2 * a, c

    monkeypatch.setitem(objectives.OBJECTIVES, "twice", CLSOnlyTwice)
    cfg = load_config(None, [t for t in TINY if "=" in t] + [f"out_dir={tmp_path / 'r'}", "epochs=1", "batch_size=32",
                                                          "eval.knn_at_end=false", "loss.objective=twice"])
    train(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt["step"] == 3 and set(ckpt["objective"]) == {"cls_center.center"}
    from pwself.cli import main

    with pytest.raises(SystemExit):  # the CLI's choices are the registry's
        main(["pretrain", "--objective", "nonexistent"])


def test_a_format_1_checkpoint_is_upgraded_and_restores(tmp_path):
    from pwself.train import _restore

    cfg = load_config(None, [t for t in TINY if "=" in t] + [f"out_dir={tmp_path / 'r'}", "epochs=1", "batch_size=32",
                                                          "eval.knn_at_end=false", "loss.objective=logo"])
    from pwself.train import train

    train(cfg, progress=False)
    new = load_checkpoint(tmp_path / "r")
    # The layout before objectives owned their state: centers under "criterion", the affinity network in
    # the student (and a copy in the teacher), every objective with a patch center.
    affinity = {k.removeprefix("local_terms."): v for k, v in new["objective"].items() if k.startswith("local_terms.")}
    old = {k: v for k, v in new.items() if k not in ("objective", "format")}
    old["criterion"] = {"cls_center.center": new["objective"]["cls_center.center"],
                        "patch_center.center": torch.zeros_like(new["objective"]["cls_center.center"])}
    old["student"] = {**new["student"], **affinity}
    old["teacher"] = {**new["teacher"], **affinity}
    up = upgrade_checkpoint(old)
    assert up["student"].keys() == new["student"].keys() and up["teacher"].keys() == new["teacher"].keys()
    for k, v in new["objective"].items():
        assert torch.equal(up["objective"][k], v), k
    run_cfg = config_from_dict(new["config"])
    step = build_step(run_cfg, torch.device("cpu"), run_cfg.data.mean, run_cfg.data.std)
    progress = _restore(step, up, torch.Generator(), 0)
    assert progress.step == 3
    for k, v in step.objective.state_dict().items():
        assert torch.equal(v, new["objective"][k]), k


def test_removed_keys_are_refused_as_overrides_and_ignored_in_saved_configs():
    with pytest.raises(ConfigError, match="backbone.img_size is no longer a key: .*views.global_size"):
        load_config(None, ["backbone.img_size=64"])
    old = config_to_dict(load_config())
    old["backbone"]["img_size"], old["data"]["channels"] = 28, 3
    assert config_to_dict(config_from_dict(old)) == config_to_dict(load_config())


def test_pwself_pretrain_evaluates_and_train_alone_does_not(tmp_path):
    """``pwself.pretrain`` = training + the standard kNN (and stays callable: its module is not named like it);
    ``pwself.train.train`` only trains unless given evaluation callbacks."""
    import pwself
    from pwself.train import train

    items = [t for t in TINY if "=" in t] + ["epochs=1", "batch_size=32", "eval.knn_floors=false"]
    for k in range(2):
        result = pwself.pretrain(load_config(None, [*items, f"out_dir={tmp_path / f'p{k}'}"]), progress=False)
        assert set(result.knn) == {10, 20} and (tmp_path / f"p{k}" / "knn.json").exists()
    bare = train(load_config(None, [*items, f"out_dir={tmp_path / 't'}"]), progress=False)
    assert bare.knn is None and not (tmp_path / "t" / "knn.json").exists()
    assert (tmp_path / "t" / "finished.json").exists()


def test_uint8_images_are_one_line_not_a_silent_scale_error():
    import pytest
    import torch

    from pwself.step import build_step

    step = build_step(load_config(None, [t for t in TINY if "=" in t]), torch.device("cpu"), [0.5], [0.25])
    images = (torch.rand(4, 1, 16, 16) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"float images in \[0, 1\], got torch.uint8: pass images.float\(\) / 255"):
        step(images, 0.04, 0.996, torch.Generator().manual_seed(0))
