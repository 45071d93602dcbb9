"""Plant plausible bugs one at a time in a scratch copy of this checkout and print which tests catch each.

    python scripts/plant_bugs.py            # every bug (about 15 minutes on 2 cores)
    python scripts/plant_bugs.py center     # the bugs whose name contains 'center'

A bug that no test catches prints '0 failed': the suite has a hole there.
"""
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
BUGS = [
 ("center: one overall mean", "pwself/losses.py", "mean = stats[:-1] / count", "mean = (stats[:-1] / count).mean().expand(stats.shape[0] - 1)"),
 ("center: step never updates", "pwself/step.py", "        self.objective.update_centers(out.teacher)\n", ""),
 ("center: no all-reduce", "pwself/losses.py", "            dist.all_reduce(stats)", "            pass"),
 ("retrieval: worst first", "pwself/eval/retrieval.py", "np.argsort(-(db @ q.T)", "np.argsort((db @ q.T)"),
 ("copydetect: whitening without the mean", "pwself/eval/copydetect.py", "db = pca.apply(db - mu)", "db = pca.apply(db)"),
 ("linear: chosen on test labels", "pwself/eval/linear.py", "val_top1 = [float(100 * (val_logits[k].argmax(-1) == y_val).float().mean()) for k in range(h)]",
  "val_top1 = [float(100 * ((((test_features.float() - mu) / sd) @ weight[k] + bias[k]).argmax(-1) == test_labels).float().mean()) for k in range(h)]"),
 ("linear: no momentum", "pwself/eval/linear.py", "mom_w.mul_(0.9).add_(gw)", "mom_w.mul_(0.0).add_(gw)"),
 ("linear: no weight decay", "pwself/eval/linear.py", "gw = gw + wd_h * weight", "gw = gw"),
 ("linear: no cosine schedule", "pwself/eval/linear.py", "scale = 0.5 * (1 + math.cos(math.pi * it / total))", "scale = 1.0"),
 ("linear: no standardization", "pwself/eval/linear.py", "sd = train_features[tr_idx].float().std(0).clamp(min=1e-6)", "sd = torch.ones(train_features.shape[1])\n    mu = mu * 0"),
 ("dense: nearest upsampling", "pwself/eval/dense.py", 'mode="bilinear", align_corners=False)', 'mode="nearest")'),
 ("dense: mean_acc is mIoU", "pwself/eval/dense.py", '"mean_acc": float(100 * acc.nanmean())', '"mean_acc": float(100 * iou.nanmean())'),
 ("knn: counts of earlier chunks lost", "pwself/eval/knn.py", "        q = test_features[start : start + chunk_size].float()", "        hits = {k: torch.zeros(2) for k in ks}\n        q = test_features[start : start + chunk_size].float()"),
 ("augment: grayscale weights 1/3", "pwself/augment.py", "return 0.299 * r + 0.587 * g + 0.114 * b", "return (r + g + b) / 3"),
 ("augment: blur sigma doubled", "pwself/augment.py", 'sigma = prm["sigma"][blur_idx, None].expand(-1, 2).to(x.dtype)', 'sigma = 2 * prm["sigma"][blur_idx, None].expand(-1, 2).to(x.dtype)'),
 ("augment: noise std as variance", "pwself/augment.py", 'noise * _per_sample(prm["noise_std"][noise_idx])', 'noise * _per_sample(prm["noise_std"][noise_idx]).sqrt()'),
 ("augment: contrast about 0.5", "pwself/augment.py", "mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)", "mean = torch.full_like(_gray(y)[:, :, :1, :1], 0.5)"),
 ("augment: saturation ignored", "pwself/augment.py", '_per_sample(prm["saturation"])', '1.0'),
]
TESTS = ["tests/test_losses.py", "tests/test_eval_references.py", "tests/test_augment.py", "tests/test_eval_suite.py",
         "tests/test_knn.py", "tests/test_dense.py", "tests/test_eval_metrics.py", "tests/test_distributed.py",
         "tests/test_step.py", "tests/test_train.py"]
only = sys.argv[1:]
for name, f, old, new in BUGS:
    if only and not any(o in name for o in only):
        continue
    dst = Path(tempfile.mkdtemp(prefix="pwself_plant_")) / "tree"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "*.pyc"))
    p = dst / f
    s = p.read_text()
    assert old in s, (name, old)
    p.write_text(s.replace(old, new))
    env = {"PYTHONPATH": str(dst), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=dst, env=env,
                       capture_output=True, text=True)
    shutil.rmtree(dst.parent, ignore_errors=True)
    failed = sorted(set(re.findall(r"FAILED (\S+?)(?: - |$)", r.stdout, re.M)))
    print(f"{name}: {len(failed)} failed: {failed}", flush=True)
