"""The benchmark script runs and writes its JSON (cheap sections only; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "matching,augment",
                    "--output", str(out)], check=True, capture_output=True, cwd=tmp_path)
    res = json.loads(out.read_text())
    assert res["quick"] is True and set(res) >= {"machine", "matching", "augment"}
    assert res["matching"]["pairs"] == 18 and res["matching"]["speedup"] > 0
    assert res["augment"]["ratio_patch_over_image"] > 0
