"""Config: YAML + overrides, typing, unknown keys, diffs."""

import pytest

from pwself.config import ConfigError, apply_overrides, config_diff, config_to_dict, load_config, save_config


def test_overrides_parse_numbers_lists_and_bools(tmp_path):
    cfg = load_config(None, ["optim.lr=4e-3", "views.global_scale=[0.3, 1.0]", "knn_at_end=false", "epochs=3"])
    assert cfg.optim.lr == 4e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.views.global_scale == (0.3, 1.0) and cfg.knn_at_end is False and cfg.epochs == 3
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
