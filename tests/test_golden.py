"""Golden runs: fixed-seed training of a few steps for every objective and step option, pinned to the numbers
the code produced before the step redesign (``tests/golden_runs.json``).

Regenerate only on purpose, and say in the commit which numbers changed and why:

    python tests/test_golden.py --regen
"""

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_runs.json"

BASE = ["data.kind=synthetic", "data.synthetic_size=48", "data.synthetic_classes=3",
        "backbone.in_chans=1", "views.global_size=16", "views.local_size=8", "views.n_local=3",
        "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "head.out_dim=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "batch_size=12", "epochs=1",
        "log_every=1", "knn_at_end=false", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.5",
        "data.num_workers=0"]

VARIANTS = {
    "dino": ["loss.objective=dino"],
    "pwml": ["loss.objective=pwml"],
    "pwsl": ["loss.objective=pwsl"],
    "pwll": ["loss.objective=pwll", "loss.lam=0.3"],
    "cossl": ["loss.objective=cossl"],
    "logo": ["loss.objective=logo"],
    "bagssl": ["loss.objective=bagssl", "views.n_global=4", "views.n_local=0", "views.global_scale=[0.25,0.25]",
               "views.global_size=8"],
    "pwml_feature_nn": ["loss.objective=pwml", "loss.matcher=feature-nn"],
    "pwml_patch_fraction": ["loss.objective=pwml", "loss.patch_fraction=0.25"],
    "pwml_recompute_head": ["loss.objective=pwml", "loss.recompute_head=true"],
    "pwml_image_photometric": ["loss.objective=pwml", "photometric.mode=image"],
}
TERMS = ("loss", "cls", "patch", "n_match", "local_affinity", "affinity_loss", "grad_norm", "teacher_entropy")


def run_variant(name: str, out_dir: Path) -> dict:
    """Train the variant for 4 steps; per-step loss terms (as logged) and a float64 fingerprint of the
    final teacher and student weights (the sum of every tensor, in name order)."""
    from pwself.checkpoint import load_checkpoint
    from pwself.config import load_config
    from pwself.train import train

    cfg = load_config(None, [*BASE, *VARIANTS[name], f"out_dir={out_dir}"])
    torch.set_num_threads(1)  # one thread: reductions sum in one order
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = load_checkpoint(out_dir)
    return {
        "steps": [{k: r[k] for k in TERMS if k in r} for r in rows],
        "teacher": {k: float(v.double().sum()) for k, v in sorted(ckpt["teacher"].items())},
        "student": {k: float(v.double().sum()) for k, v in sorted(ckpt["student"].items())},
        "objective": {k: float(v.double().sum()) for k, v in sorted(ckpt.get("objective", {}).items())},
    }


def _pick_weights(d: dict, part: str) -> dict:
    """Fingerprints by parameter name of the backbone and head, and of LoGo's affinity network, which the
    student held before the step redesign (``affinity.*``) and the objective holds now
    (``objective.local_terms.affinity.*``)."""
    out = {k: v for k, v in d[part].items() if k.startswith(("backbone.", "head."))}
    if part == "student":
        out.update({k: v for k, v in d["student"].items() if k.startswith("affinity.")})
        out.update({k.removeprefix("local_terms."): v for k, v in d.get("objective", {}).items()
                    if k.startswith("local_terms.affinity.")})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden_run(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())[name]
    got = run_variant(name, tmp_path / name)
    assert len(got["steps"]) == len(golden["steps"])
    for step, (g, w) in enumerate(zip(got["steps"], golden["steps"])):
        assert g.keys() == w.keys(), step
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=2e-6), (step, k)
    for part in ("teacher", "student"):
        want, have = _pick_weights(golden, part), _pick_weights(got, part)
        assert have.keys() == want.keys()
        for k in want:
            assert have[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), (part, k)


if __name__ == "__main__" and "--regen" in sys.argv:
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: run_variant(name, Path(tmp) / name) for name in VARIANTS}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
