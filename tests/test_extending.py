"""Extending pwself is one module plus one registry line: an objective with a knob of its own, registered from
outside the package, is validated, shown by `pwself config show`, set as KEY=VALUE and trained through the CLI."""

import json
from dataclasses import dataclass

import pytest
import torch
import yaml

from pwself.cli import main
from pwself.config import ConfigError, load_config
from pwself.objectives import OBJECTIVES, register_objective
from pwself.objectives.dino import DINO
from pwself.sections import POSITIVE, check_ranges

TINY = ["data.kind=synthetic", "data.synthetic_size=64", "views.global_size=16", "views.local_size=8",
        "views.n_local=2", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "knn_at_end=false"]


@dataclass
class ScaledOptions:
    """The toy's own knobs (``objectives.scaled.*``).

    Attributes:
        scale: Factor the DINO loss is multiplied by.
    """

    scale: float = 1.0

    def validate(self, prefix: str) -> None:
        check_ranges(self, prefix, {"scale": POSITIVE})


class Scaled(DINO):
    """DINO's loss times ``scale``: a knob that changes every logged loss by a known factor."""

    Options = ScaledOptions

    def loss(self, student, teacher, views, teacher_temp):
        terms = super().loss(student, teacher, views, teacher_temp)
        return {**terms, "loss": terms["loss"] * self.options.scale}


@pytest.fixture
def toy():
    register_objective("scaled", Scaled)
    yield
    OBJECTIVES.pop("scaled")


def test_a_toy_objective_knob_is_shown_set_validated_and_trained(toy, tmp_path, capsys):
    assert main(["config", "show", "loss.objective=scaled", "objectives.scaled.scale=3"]) == 0
    shown = capsys.readouterr().out
    assert "  scaled:  # The toy's own knobs" in shown
    assert "    scale: 3.0  # Factor the DINO loss is multiplied by." in shown
    assert yaml.safe_load(shown)["objectives"]["scaled"] == {"scale": 3.0}  # config show's output is a config file
    with pytest.raises(ConfigError, match=r"objectives.scaled.scale=-1.0 is out of range: it must be > 0"):
        load_config(None, ["loss.objective=scaled", "objectives.scaled.scale=-1"])

    losses = {}
    for scale in (1, 3):
        out = tmp_path / f"scale{scale}"
        assert main(["pretrain", "--objective", "scaled", "--out-dir", str(out), "--batch-size", "16", "--epochs", "1",
                     "--no-progress", *TINY, f"objectives.scaled.scale={scale}"]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[scale] = torch.tensor([r["loss"] for r in rows])
        assert yaml.safe_load((out / "config.yaml").read_text())["objectives"]["scaled"]["scale"] == scale
    # Step 1 is the same draw at both scales: its loss is 3x (later steps differ, the gradients did).
    assert float(losses[3][0]) == pytest.approx(3 * float(losses[1][0]), rel=1e-3)


def test_renamed_keys_still_read_from_old_files_and_overrides(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  objective: logo\n  logo_weight: 0.01\n  cossl_weight: 0.5\n")
    cfg = load_config(old, ["loss.logo_weight=0.02"])
    assert cfg.objectives.logo.weight == 0.02 and cfg.objectives.cossl.weight == 0.5
    assert "loss.logo_weight is now objectives.logo.weight" in caplog.text
