"""Golden runs: fixed-seed training of a few steps for every objective and step option, pinned in
``tests/golden_runs.json``.

The runs are in float64 (``precision=fp64``), where the kernels of other CPUs (AVX2 or AVX-512, Intel or AMD,
MKL or oneDNN paths, thread counts) change results by about 1e-14 relative; the weights are pinned at 1e-9,
so a change of the computation shows while a change of machine does not. The same runs in float32 are held
to the float64 numbers at float32's own precision (float32 and float64 runs draw the same random numbers).

Regenerate only on purpose, and say in the commit which numbers changed and why:

    python tests/test_golden.py --regen            # every variant
    python tests/test_golden.py --regen NAME ...   # add or renew these only, the others kept as they are
"""

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_runs.json"

BASE = ["data.kind=synthetic", "data.synthetic_size=48", "data.synthetic_classes=3",
        "backbone.in_chans=1", "views.global_size=16", "views.local_size=8", "views.n_local=3",
        "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "head.out_dim=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "batch_size=12", "epochs=1",
        "log_every=1", "eval.knn_at_end=false", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.5",
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
    "ibot": ["loss.objective=ibot"],
    "pwml_ibot": ["loss.objective=pwml_ibot"],
    "dinov2_sinkhorn": ["loss.objective=ibot", "loss.koleo_weight=0.1", "head.patch_head=separate",
                        "loss.centering=sinkhorn"],
}
# Logged terms and the rounding of metrics.jsonl (decimals): a logged value is exact to half of its last digit.
TERMS = {"loss": 6, "cls": 6, "patch": 6, "n_match": 6, "local_affinity": 6, "affinity_loss": 6, "ibot": 6,
         "koleo": 6, "grad_norm": 4, "teacher_entropy": 4}
# (rel, abs) tolerances. float64: the spread over forced kernel variants on one machine was <= 4e-14 relative
# (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, MKL_CBWR, 1 or 2 threads). float32 against
# the float64 numbers: the gap was <= 9e-6 relative on terms and <= 9e-7 absolute on weight sums, with the
# float32 spread across kernel variants inside it; the bounds below are 10x those.
FP64 = {"terms": (1e-9, 0.0), "weights": (1e-9, 1e-12)}
FP32 = {"terms": (1e-4, 1e-5), "weights": (1e-6, 1e-5)}


def run_variant(name: str, out_dir: Path, extra: tuple[str, ...] = ("precision=fp64",)) -> dict:
    """Train the variant for 4 steps; per-step loss terms (as logged) and a float64 fingerprint of the
    final teacher and student weights (the sum of every tensor, in name order)."""
    from pwself.config import load_config
    from pwself.run.checkpoint import load_checkpoint
    from pwself.train import train

    cfg = load_config(None, [*BASE, *VARIANTS[name], *extra, f"out_dir={out_dir}"])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = load_checkpoint(out_dir)
    return {
        "steps": [{k: r[k] for k in TERMS if k in r} for r in rows],
        "teacher": {k: float(v.double().sum()) for k, v in sorted(ckpt["teacher"].items())},
        "student": {k: float(v.double().sum()) for k, v in sorted(ckpt["student"].items())},
        "objective": {k: float(v.double().sum()) for k, v in sorted(ckpt.get("objective", {}).items())},
    }


def mismatches(got: dict, want: dict, tol: dict) -> list[str]:
    """Every logged term and weight sum of ``got`` that is not ``want``'s within ``tol`` (plus, for a logged
    term, its rounding), as ``where: got != want``; empty when the run reproduces."""
    out = []
    if len(got["steps"]) != len(want["steps"]):
        return [f"{len(got['steps'])} logged steps != {len(want['steps'])}"]
    rel, abs_ = tol["terms"]
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"])):
        if g.keys() != w.keys():
            out.append(f"step {step}: terms {sorted(g)} != {sorted(w)}")
        for k in w.keys() & g.keys():
            if g[k] != pytest.approx(w[k], rel=rel, abs=abs_ + 0.51 * 10.0 ** -TERMS[k]):
                out.append(f"step {step} {k}: {g[k]} != {w[k]}")
    rel, abs_ = tol["weights"]
    for part in ("teacher", "student", "objective"):
        g, w = got.get(part, {}), want.get(part, {})
        if g.keys() != w.keys():
            out.append(f"{part}: tensors {sorted(g.keys() ^ w.keys())} differ")
        out += [f"{part} {k}: {g[k]!r} != {w[k]!r}" for k in sorted(w.keys() & g.keys())
                if g[k] != pytest.approx(w[k], rel=rel, abs=abs_)]
    return out


def _golden(name: str) -> dict:
    return json.loads(GOLDEN.read_text())[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden_run(name, tmp_path):
    assert mismatches(run_variant(name, tmp_path / name), _golden(name), FP64) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden_run_float32(name, tmp_path):
    got = run_variant(name, tmp_path / name, extra=())
    assert mismatches(got, _golden(name), FP32) == []
    assert mismatches(got, _golden(name), FP64), "float32 matched float64 at 1e-9: is the float32 run float32?"


def _drop_first_match(monkeypatch):
    """Patch matching so that the first matched patch pair of the run's first step is lost."""
    import pwself.objectives.patchwise as patchwise
    from pwself.matching import PatchPairs

    real, calls = patchwise.match_views, []

    def match_views(*args, **kwargs):
        m = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > 1:
            return m
        return PatchPairs(m.teacher_token[1:], m.student_token[1:], m.pair_index[1:], m.n_pairs, m.batch)

    monkeypatch.setattr(patchwise, "match_views", match_views)


@pytest.mark.slow
@pytest.mark.parametrize("variant,change", [
    ("pwml", "optim.lr=0.0005005"),  # the default lr x 1.001
    ("pwll", "loss.lam=0.301"),  # the CLS/patch weight changed by 1e-3
    ("pwml", "drop one matched pair"),
    ("dino", "loss.center_momentum=0.899"),
])
def test_golden_comparison_catches_a_small_change(variant, change, tmp_path, monkeypatch):
    """Each small change to a run fails the float64 comparison, in the weights themselves (not only in a
    logged term): the tolerance is not vacuous."""
    from pwself.config import TrainConfig

    if change == "optim.lr=0.0005005":
        assert TrainConfig().optim.lr == 0.0005
    extra = ("precision=fp64",)
    if change == "drop one matched pair":
        _drop_first_match(monkeypatch)
    else:
        extra += (change,)
    found = mismatches(run_variant(variant, tmp_path / "run", extra), _golden(variant), FP64)
    assert any(m.startswith(("teacher", "student")) for m in found), found


@pytest.mark.parametrize("side", [8, 12, 16])
def test_float64_backbone_is_timms_vit(side):
    """A float64 backbone resamples its position embedding in float64 (timm does it in float32, which rounds
    differently on other CPUs); its features are timm's own float32 features to float32 precision."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from pwself.models import BackboneConfig, make_vit

    torch.manual_seed(0)
    vit = make_vit(BackboneConfig(patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2), 16).eval()
    x = torch.randn(3, 1, side, side)
    with torch.no_grad():
        ref = VisionTransformer.forward_features(vit, x).double()
        got = vit.double().forward_features(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


if __name__ == "__main__" and "--regen" in sys.argv:
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    names = sys.argv[sys.argv.index("--regen") + 1:] or list(VARIANTS)
    out = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        out.update({name: run_variant(name, Path(tmp) / name) for name in names})
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
