"""Extending pwself is one module plus one registry line: an objective with a knob of its own, registered from
outside the package, is validated, shown by `pwself config show`, set as KEY=VALUE and trained through the CLI; a
protocol with a knob gets its own `pwself eval-NAME` command and flag, a column in `compare` and a section in the
run's report; a data kind (RGB, in memory) is trained, compared and reported on."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pwself.cli import main
from pwself.config import ConfigError, load_config
from pwself.data import DATA_KINDS, DataKind, register_data_kind
from pwself.eval.protocols import PROTOCOLS, register_protocol
from pwself.eval.registry import Protocol
from pwself.objectives import OBJECTIVES, register_objective
from pwself.objectives.dino import DINO
from pwself.sections import POSITIVE, check_ranges

TINY = ["data.kind=synthetic", "data.synthetic_size=64", "views.global_size=16", "views.local_size=8",
        "views.n_local=2", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "eval.knn_at_end=false"]


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

    # compare takes it with its knob like a built-in objective; the report names it.
    out = tmp_path / "cmp"
    assert main(["compare", "--objectives", "scaled:objectives.scaled.scale=3", "--seeds", "0", "--out-dir", str(out),
                 "--no-progress", *TINY, "epochs=1", "batch_size=16"]) == 0
    run = out / "scaled_objectives.scaled.scale-3_seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["objectives"]["scaled"]["scale"] == 3
    assert "| scaled:objectives.scaled.scale=3 |" in (out / "comparison.md").read_text()
    assert main(["report", str(run)]) == 0
    assert "objective scaled," in (run / "report.md").read_text()


def test_renamed_keys_still_read_from_old_files_and_overrides(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  objective: logo\n  logo_weight: 0.01\n  cossl_weight: 0.5\n")
    cfg = load_config(old, ["loss.logo_weight=0.02"])
    assert cfg.objectives.logo.weight == 0.02 and cfg.objectives.cossl.weight == 0.5
    assert "loss.logo_weight is now objectives.logo.weight" in caplog.text


# A toy protocol: nearest class centroid on frozen features, with one knob and one flag, in this one block (a
# user's module) and one registry line (register_protocol).
@dataclass(frozen=True)
class CentroidSettings:
    """The toy protocol's knobs.

    Attributes:
        normalize: Compare L2-normalised queries with L2-normalised class means (else raw dot products).
    """

    normalize: bool = True


def centroid_accuracy(feats, options, settings):
    (xb, yb), (xq, yq) = feats["train"], feats["test"]
    classes = yb.unique()
    centroids = torch.stack([xb[yb == c].double().mean(0) for c in classes])
    xq = xq.double()
    if options.normalize:
        centroids, xq = torch.nn.functional.normalize(centroids, dim=1), torch.nn.functional.normalize(xq, dim=1)
    pred = classes[(xq @ centroids.T).argmax(1)]
    return {"top1": float(100 * (pred == yq).double().mean())}


def _centroid_flags(p, alone):
    p.add_argument("--raw-dot", action="store_true", help="the toy centroid protocol without normalisation")


CENTROID = Protocol("centroid", "nearest class centroid on frozen features", CentroidSettings, centroid_accuracy,
                    table=lambda per_model, note: ["### Nearest centroid", "", "| model | top-1 % |", "|---|---|",
                                                   *(f"| {m} | {r['top1']:.2f} |" for m, r in per_model.items()), ""],
                    scores=lambda res: {"centroid": res["top1"]}, flags=_centroid_flags,
                    from_flags=lambda args, alone: CentroidSettings(normalize=not args.raw_dot))


@pytest.fixture
def centroid():
    register_protocol(CENTROID)
    yield
    PROTOCOLS.pop("centroid")


def _reference_centroid(run, normalize):
    """The toy's score recomputed from the run's own features, outside the CLI (what the flags must reach)."""
    from pwself.eval.protocols import EvalData, EvalSettings, features
    from pwself.eval.source import open_source
    from pwself.run.state import read_run_config

    feats = features(open_source(str(run)), EvalData.of_run(read_run_config(run)), "auto",
                     EvalSettings(cache_dir=None, progress=False))
    return centroid_accuracy(feats, CentroidSettings(normalize), None)["top1"]


def test_a_toy_protocol_reaches_the_cli_compare_and_the_report(centroid, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--objectives", "dino", "--seeds", "0", "--protocols", "centroid", "--out-dir", str(out),
                 "--no-progress", *TINY, "epochs=1", "batch_size=16"]) == 0
    run = out / "dino_seed0"
    want = _reference_centroid(run, normalize=True)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["runs"]["dino"]["0"]["centroid"] == pytest.approx(want, abs=1e-9)
    header = (out / "comparison.md").read_text().splitlines()[2]
    assert header.endswith("| linear | centroid |")  # its score is a column of the table

    capsys.readouterr()
    assert main(["eval-centroid", str(run), "--raw-dot", "--cache-dir", "", "--no-progress",
                 "--output", str(tmp_path / "toy")]) == 0  # its own command, its own flag
    raw = json.loads((tmp_path / "toy.json").read_text())["centroid"]["cls"][str(run)]["top1"]
    assert raw == pytest.approx(_reference_centroid(run, normalize=False), abs=1e-9)
    assert f"| {run} | {raw:.2f} |" in capsys.readouterr().out
    assert main(["eval", str(run), "--cache-dir", "", "--no-progress", "--output", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["centroid"]["cls"][str(run)]["top1"] == pytest.approx(want)

    report = (run / "report.md").read_text()  # compare redrew it: the score, as the protocol draws it
    assert "## nearest class centroid on frozen features" in report and f"| dino_seed0 | {want:.2f} |" in report


# A toy data kind: RGB images and labels in NumPy archives (ROOT/train.npz, ROOT/test.npz), decoded in memory; its
# channels (3) are declared, so a run needs no backbone.in_chans. One block and one registry line.
def open_npz(root, split, options):
    import numpy as np

    from pwself.data import TensorImageDataset

    with np.load(Path(root) / f"{split}.npz") as f:
        return TensorImageDataset(torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous(),
                                  torch.from_numpy(f["labels"]))


NPZ = DataKind("npz", open_npz, channels=3)


@pytest.fixture
def npz_data(tmp_path):
    import numpy as np

    from pwself.data import make_synthetic

    register_data_kind(NPZ)
    root = tmp_path / "npz"
    root.mkdir()
    for split, n, seed in (("train", 64, 0), ("test", 32, 1)):
        ds = make_synthetic(n, 16, 3, 4, seed)
        np.savez(root / f"{split}.npz", images=ds.images.permute(0, 2, 3, 1).numpy(), labels=ds.labels.numpy())
    yield root
    DATA_KINDS.pop("npz")


def test_a_toy_rgb_data_kind_is_trained_compared_and_reported(npz_data, tmp_path, capsys):
    data = ["data.kind=npz", f"data.root={npz_data}"]
    tiny = [o for o in TINY if not o.startswith("data.")] + data
    with pytest.raises(ConfigError, match="data.kind='npy': use idx, cifar, folder, synthetic or npz"):
        load_config(None, [*tiny, "data.kind=npy"])
    assert load_config(None, tiny).backbone.in_chans == 3  # the kind's channels, not the grey default

    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--batch-size", "16", "--epochs", "1", "--no-progress", *tiny,
                 "eval.knn_at_end=true"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["in_chans"] == 3
    knn = json.loads((run / "knn.json").read_text())["knn"]  # its test split is the held-out one kNN reads
    assert 0 <= knn["10"]["top1"] <= 100
    assert "64 training images (data.kind npz, npz)" in (run / "report.md").read_text()

    out = tmp_path / "cmp"
    assert main(["compare", "--objectives", "dino", "--seeds", "0", "--out-dir", str(out), "--no-progress", *tiny,
                 "epochs=1", "batch_size=16"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["config"]["data"]["kind"] == "npz" and comparison["runs"]["dino"]["0"]["knn10"] >= 0
    assert comparison["random_init"]["0"]["knn10"] >= 0  # the floors read the kind too
    assert "| dino |" in (out / "comparison.md").read_text()


def test_a_protocol_whose_flag_is_taken_is_one_line(capsys):
    """A registered protocol that adds a flag `pwself eval` already has (linear's --epochs) is named, with the fix."""
    def flags(p, alone):
        p.add_argument("--epochs", type=int, default=1)

    register_protocol(Protocol("clash", "a protocol with a taken flag", CentroidSettings, centroid_accuracy,
                               table=lambda per_model, note: [], scores=lambda r: {}, flags=flags,
                               from_flags=lambda args, alone: CentroidSettings()))
    try:
        assert main(["config", "show"]) == 2
    finally:
        PROTOCOLS.pop("clash")
    err = capsys.readouterr().err
    assert "protocol clash: --epochs is taken on `pwself eval` by another protocol" in err and "in_eval=False" in err


def test_a_protocol_without_from_flags_reads_flags_named_as_its_settings():
    """Protocol.settings' default: each settings field from the flag of its name; one not given keeps its default."""
    import argparse

    from pwself.eval.knn import KnnSettings

    plain = Protocol("plain", "no from_flags", KnnSettings, centroid_accuracy, table=lambda per_model, note: [],
                     scores=lambda r: {})
    assert plain.settings(argparse.Namespace(temperature=0.2, ks=None, other=1), True) == KnnSettings(temperature=0.2)
