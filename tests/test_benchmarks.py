"""The benchmark script runs and writes its JSON (cheap sections only; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, only: str) -> dict:
    """``benchmarks/run.py --quick --only ONLY`` in a scratch folder; its JSON."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", only,
                    "--output", str(out)], check=True, capture_output=True, cwd=tmp_path)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_benchmark_script_writes_ratios(tmp_path):
    res = _bench(tmp_path, "matching,augment")
    assert res["quick"] is True and set(res) >= {"machine", "matching", "augment"}
    assert res["matching"]["pairs"] == 18 and res["matching"]["speedup"] > 0
    assert res["augment"]["ratio_patch_over_image"] > 0


@pytest.mark.slow
def test_photo_loader_benchmark_writes_its_keys(tmp_path):
    pl = _bench(tmp_path, "photo_loader")["photo_loader"]
    for key in ("small_img_s", "large_img_s", "ratio", "large_img_s_no_cache", "ratio_no_cache"):
        assert pl[key] > 0, key
    assert pl["ratio"] == pytest.approx(pl["large_img_s"] / pl["small_img_s"])
    assert set(pl["scan"]) >= {"small_img_s", "large_img_s", "ratio", "large_over_full_decode"}


def test_official_style_step_has_the_pwml_loss_and_more_flops():
    """The benchmark's peer: the head on every token (the public implementation's cost), the loss on the
    matched pairs only: the same loss as exact PWML, more FLOPs. A split patch head of 1/8 the output costs
    fewer FLOPs than exact PWML."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench

    tiny = ["views.global_size=16", "views.local_size=8", "views.n_local=3", "backbone.embed_dim=32",
            "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=64", "head.hidden_dim=32",
            "head.bottleneck_dim=16"]
    runners = {name: bench.StepRunner(bench.config("pwml", [*tiny, *extra]), 4, image=20)
               for name, extra in (("pwml", []), ("official", []),
                                   ("split", ["head.patch_head=split", "head.patch_out_dim=8"]))}
    runners["official"].step.objective = bench.OfficialStylePWML(runners["official"].step.objective)
    import torch

    losses = {}
    for name, r in runners.items():
        r.gen.manual_seed(0)
        with torch.no_grad():
            losses[name] = r.forward().terms["loss"]
    torch.testing.assert_close(losses["official"], losses["pwml"], rtol=1e-5, atol=1e-6)
    flops = {name: bench._step_flops(r) for name, r in runners.items()}
    assert flops["official"] > flops["pwml"] > flops["split"]


@pytest.mark.slow
def test_dense_baselines_benchmark_times_every_objective_of_the_dense_comparison(tmp_path):
    db = _bench(tmp_path, "dense_baselines")["dense_baselines"]
    assert list(db["step_s"]) == ["dino", "ibot", "dinov2", "pwml", "pwml_ibot"]
    assert db["step_ratio_over_dino"]["dino"] == 1.0 and db["flop_ratio_over_dino"]["dino"] == 1.0
    # The masked term adds the patch tokens of the global views to the head: more FLOPs than DINO's CLS only.
    assert db["flop_ratio_over_dino"]["ibot"] > 1.0 and db["flop_ratio_over_dino"]["pwml_ibot"] > 1.0


def test_the_lightly_peer_does_the_same_work_as_pwself_on_the_same_views():
    """benchmarks/peers.py compares like with like: lightly's DINO and iBOT steps, built around the same ViT and
    head sizes, count the same matmul FLOPs as pwself's on the same views (iBOT's within the masked-cell draw),
    and every ratio key is written. An 8 x 8 grid: lightly's block masks need 4 cells a block."""
    pytest.importorskip("lightly", reason="lightly is not installed (pip install -e '.[peers]')")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers
    import run as bench

    tiny = ["views.global_size=32", "views.local_size=16", "views.n_local=2", "backbone.embed_dim=32",
            "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=64", "head.hidden_dim=32",
            "head.bottleneck_dim=16"]
    res = peers.compare_steps(lambda o, e: bench.StepRunner(bench.config(o, [*tiny, *e]), 8, image=36), [], 8, 1,
                              100.0)
    assert res["flops"]["pwself_dino"] == pytest.approx(res["flops"]["lightly_dino"], rel=1e-3)
    assert res["flops"]["lightly_dino_per_view"] == res["flops"]["lightly_dino"]
    assert res["flops"]["pwself_ibot"] == pytest.approx(res["flops"]["lightly_ibot"], rel=0.1)
    assert res["flops"]["pwself_pwml"] > res["flops"]["pwself_dino"]
    assert set(res["ratio"]) == {"pwself_dino_over_lightly_dino", "pwself_ibot_over_lightly_ibot",
                                 "pwself_pwml_over_lightly_dino", "lightly_dino_per_view_over_lightly_dino"}
    for name, fraction in res["fraction_of_gemm_peak"].items():  # achieved FLOP/s over the 100 GFLOP/s given
        assert fraction == pytest.approx(res["flops"][name] / res["step_s"][name] / 1e9 / 100.0)


def test_the_step_breakdown_names_every_part_and_its_shares_sum_to_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers
    import run as bench

    tiny = ["views.global_size=32", "views.local_size=16", "views.n_local=2", "backbone.embed_dim=32",
            "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=64", "head.hidden_dim=32",
            "head.bottleneck_dim=16"]
    res = peers.step_breakdown(bench.StepRunner(bench.config("pwml", tiny), 8, image=36), 1)
    assert set(res["share"]) == {"views_and_augment", "matching", "teacher_backbone_forward", "optimizer", "ema",
                                 "student_backbone_forward_backward", "heads_and_losses"}
    assert sum(res["share"].values()) == pytest.approx(1.0) and all(v >= 0 for v in res["share"].values())
    assert res["seconds"]["student_backbone_forward_backward"] > 0
