"""Config: YAML + overrides, typing, unknown keys, diffs."""

import pytest

from pwself.config import ConfigError, apply_overrides, config_diff, config_to_dict, load_config, save_config


def test_overrides_parse_numbers_lists_and_bools(tmp_path):
    cfg = load_config(None, ["optim.lr=4e-3", "views.global_scale=[0.3, 1.0]", "eval.knn_at_end=false", "epochs=3"])
    assert cfg.optim.lr == 4e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.views.global_scale == (0.3, 1.0) and cfg.eval.knn_at_end is False and cfg.epochs == 3
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="epochs must be int"):
        load_config(None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["epochs"])


def test_diff_ignores_run_only_keys():
    a = config_to_dict(load_config())
    b = config_to_dict(apply_overrides(load_config(), ["out_dir=elsewhere", "epochs=99", "optim.lr=0.1"]))
    assert config_diff(a, b) == ["epochs", "optim.lr"]  # epochs sets every schedule's length: not resume-free


def test_split_choices_keeps_the_commas_of_bracketed_values():
    from pwself.config import split_choices

    assert split_choices("dino, pwml:objectives.ibot.mask_ratio=[0.1,0.5],,ibot") == [
        "dino", "pwml:objectives.ibot.mask_ratio=[0.1,0.5]", "ibot"]
    assert split_choices("1e-4,[1,2],3") == ["1e-4", "[1,2]", "3"] and split_choices(" , ") == []


def test_evaluation_keys_of_older_runs_are_read_in_the_eval_section(tmp_path, caplog):
    """Issue 42: the evaluation settings moved to their own section (``eval.*``); configs, overrides and the
    config.yaml of runs written before keep working, each old key said once."""
    from pwself.run.folder import RunFolder
    from pwself.run.state import read_run_config

    cfg = load_config(None, ["knn_every_epochs=0.5", "knn_floors=false"])
    assert cfg.eval.knn_every_epochs == 0.5 and cfg.eval.knn_floors is False
    assert "knn_every_epochs is now eval.knn_every_epochs: write eval.knn_every_epochs=0.5" in caplog.text
    run = RunFolder(tmp_path)
    run.config.write_text("seed: 3\nknn_at_end: false\ndense_every_epochs: 1\ndense_data: scenes\n")
    saved = read_run_config(tmp_path)
    assert (saved.seed, saved.eval.knn_at_end, saved.eval.dense_every_epochs, saved.eval.dense_data) == (
        3, False, 1.0, "scenes")
    with pytest.raises(ConfigError, match=r"eval.dense_every_epochs=1.0 needs eval.dense_data=DIR"):
        load_config(None, ["eval.dense_every_epochs=1"])


def test_each_keys_help_is_its_field_metadata():
    """Issue 42: `config show` reads a key's help from its field's metadata; a field without takes the first
    sentence of its docstring entry, kept in its metadata from then on."""
    from dataclasses import dataclass, field, fields

    from pwself.config import TrainConfig, describe_config
    from pwself.sections import field_help

    @dataclass
    class Section:
        """A section.

        Attributes:
            a: From the docstring. Only the first sentence.
            b: Not this one.
        """

        a: int = 1
        b: int = field(default=2, metadata={"help": "From the metadata."})

    assert field_help(Section) == {"a": "From the docstring.", "b": "From the metadata."}
    assert fields(Section)[0].metadata["help"] == "From the docstring."
    shown = describe_config(TrainConfig())
    help_of_lr = {f.name: f.metadata.get("help") for f in fields(TrainConfig().optim)}["lr"]
    assert help_of_lr == "Peak learning rate for batch 256." and f"  lr: 0.0005  # {help_of_lr}" in shown
    assert "eval:  # What the run evaluates while it trains and when it ends (kNN, floors, the dense probe)." in shown
