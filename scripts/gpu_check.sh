#!/usr/bin/env bash
# The GPU check, one command: CUDA tests, a 30-step ViT-S/16 224/96 run on synthetic data, and the real-scale
# benchmark with CUDA step times and peak memory. For a bare single-GPU machine with its own PyTorch and no
# network: pwself runs from this checkout (PYTHONPATH), wheels it lacks (kornia, timm, ...) are taken from a
# git-ignored .whl/ folder with pip --no-index. Fails loudly on any error.
#
#   bash scripts/gpu_check.sh OUT_DIR                 # on the GPU machine (about 8 minutes)
#   bash scripts/gpu_check.sh OUT_DIR --cpu-dry-run   # here: everything but the CUDA parts, smaller
#
# Writes OUT_DIR/gpu_check.log and OUT_DIR/real_scale.json (and the run's metrics in OUT_DIR/run/).
set -euo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR [--cpu-dry-run]}"
dry="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
cd "$root"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links .whl .whl/*.whl
fi
"$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "timm", "kornia", "yaml", "safetensors", "tqdm", "matplotlib", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing}: put their wheels in .whl/ (pip download -d .whl ...)")
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF

if [ "$dry" = "--cpu-dry-run" ]; then
  device=cpu; steps=2; batch=2; quick=--quick
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible')"
  device=cuda; steps=30; batch=32; quick=
fi

echo "== CUDA tests"
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || [ "$dry" = "--cpu-dry-run" ]

echo "== ${steps}-step ViT-S/16 224/96 run on synthetic data ($device)"
"$PY" -m pwself.cli pretrain --config vit_small_folder --out-dir "$out/run" --overwrite --no-progress \
  data.kind=synthetic data.synthetic_size=$((steps * batch)) data.image_size=256 data.num_workers=2 \
  --epochs 1 --batch-size "$batch" --device "$device" precision=$([ "$device" = cuda ] && echo bf16 || echo fp32) \
  eval.knn_at_end=false eval.knn_floors=false log_every=1 optim.warmup_epochs=0.1 checkpoint_every_steps=0
"$PY" - "$out/run/metrics.jsonl" "$steps" <<'PYEOF'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
assert len(rows) == int(sys.argv[2]), f"expected {sys.argv[2]} metric rows, got {len(rows)}"
assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows), "non-finite loss"
print("loss first/last:", rows[0]["loss"], rows[-1]["loss"], "images/s last:", rows[-1]["images_per_s"])
PYEOF

echo "== real-scale benchmark"
"$PY" benchmarks/run.py --only real_scale $quick --output "$out/real_scale.json"
echo "gpu_check: all passed; results in $out"
