"""Plant plausible bugs one at a time in a scratch copy of this checkout and print which quick tests catch each.

    python scripts/plant_bugs.py            # every bug (about 30 minutes on 2 cores)
    python scripts/plant_bugs.py center     # the bugs whose name contains 'center'

A bug that no test catches prints '0 failed': the suite has a hole there. Only quick tests run (-m "not slow"):
a bug must be caught by the suite a developer runs between commits. The areas of issue 40 (iBOT, masks, teacher,
run state, Sinkhorn-Knopp under DDP, cache keys) and issue 41 (warm-up, Gram anchoring, loading) name the test
files that guard them, so that each bug runs only those; the summary counts caught / planted per area.
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
 ("dense: mean_acc is mIoU", "pwself/eval/metrics.py", '"mean_acc": float(100 * acc.nanmean())', '"mean_acc": float(100 * iou.nanmean())'),
 ("knn: counts of earlier chunks lost", "pwself/eval/knn.py", "        q = test_features[start : start + chunk_size].float()", "        hits = {k: torch.zeros(2) for k in ks}\n        q = test_features[start : start + chunk_size].float()"),
 ("augment: grayscale weights 1/3", "pwself/augment.py", "return 0.299 * r + 0.587 * g + 0.114 * b", "return (r + g + b) / 3"),
 ("augment: blur sigma doubled", "pwself/augment.py", 'sigma = prm["sigma"][blur_idx, None].expand(-1, 2).to(x.dtype)', 'sigma = 2 * prm["sigma"][blur_idx, None].expand(-1, 2).to(x.dtype)'),
 ("augment: noise std as variance", "pwself/augment.py", 'noise * _per_sample(prm["noise_std"][noise_idx])', 'noise * _per_sample(prm["noise_std"][noise_idx]).sqrt()'),
 ("augment: contrast about 0.5", "pwself/augment.py", "mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)", "mean = torch.full_like(_gray(y)[:, :, :1, :1], 0.5)"),
 ("augment: saturation ignored", "pwself/augment.py", '_per_sample(prm["saturation"])', '1.0'),
]
GUARDS = ["tests/test_guards.py", "tests/test_ibot.py", "tests/test_trusted_caches.py", "tests/test_photos.py"]


def guard(words: str) -> list[str]:
    """The guard tests whose names hold ``words`` (a pytest -k expression): the quick tests of one area."""
    return [*GUARDS, "-k", words]


IBOT, MASKS, TEACHER = guard("ibot_patch_center"), guard("masks or masked"), guard("teacher")
RUNSTATE, SK, CACHES = guard("run_state"), guard("sinkhorn"), guard("cache or key or stamp or copy")
NEW = [  # (name, file, old, new, test files): issue 40's areas and issue 41's new code
 ("ibot: patch center never updated", "pwself/objectives/ibot.py", "            self.patch_center.update(teacher.patch)", "            pass", IBOT),
 ("masks: every crop from the first bin", "pwself/masking.py", "_uniform(generator, bounds[i], bounds[i + 1])", "_uniform(generator, bounds[0], bounds[1])", MASKS),
 ("masks: one cell more", "pwself/masking.py", "int(n_tokens * _uniform(generator, bounds[i], bounds[i + 1]))", "int(n_tokens * _uniform(generator, bounds[i], bounds[i + 1])) + 1", MASKS),
 ("masks: block loop off by one", "pwself/masking.py", "    while count < n_masked:", "    while count <= n_masked:", MASKS),
 ("masks: not shuffled", "pwself/masking.py", "order = torch.randperm(n_crops, generator=generator)", "order = torch.arange(n_crops)", MASKS),
 ("teacher: requires_grad left on", "pwself/step.py", "teacher = copy.deepcopy(model).requires_grad_(False).eval()", "teacher = copy.deepcopy(model).eval()", TEACHER),
 ("teacher: forward outside no_grad", "pwself/step.py", "    with torch.no_grad():\n        t_tokens = teacher.encode([views.global_crops])", "    if True:\n        t_tokens = teacher.encode([views.global_crops])", TEACHER),
 ("run state: finished by the final kNN", "pwself/run/state.py", "    if RunFolder(run_dir).finished.exists():", "    if RunFolder(run_dir).knn.exists():", RUNSTATE),
 ("run state: no weights check", "pwself/run/state.py", "if not holds_run(run_dir) or not holds_weights(run_dir):", "if not holds_run(run_dir):", RUNSTATE),
 ("run state: resume whatever was found", "pwself/run/state.py", "run_dir, state.kind == \"interrupted\",", "run_dir, state.kind != \"finished\",", RUNSTATE),
 ("sinkhorn: row sums not all-reduced", "pwself/losses.py", "q /= _all_reduce(q.sum(1, keepdim=True)) * k", "q /= q.sum(1, keepdim=True) * k", SK),
# Not planted: N not all-reduced in sinkhorn_knopp. The columns are scaled to 1/N and the result multiplied by N,
# so N cancels (and the row step is scale-free): the same targets whatever N is, an equivalent mutant.
 ("sinkhorn: total not all-reduced", "pwself/losses.py", "q /= _all_reduce(q.sum().reshape(1))", "q /= q.sum().reshape(1)", SK),
 ("shrunk key: no channels", "pwself/data/photos.py", 'f"{digest}-{channels}-{max_side}.jpg"', 'f"{digest}-{max_side}.jpg"', CACHES),
 ("shrunk key: no bound", "pwself/data/photos.py", 'f"{digest}-{channels}-{max_side}.jpg"', 'f"{digest}-{channels}.jpg"', CACHES),
 ("scan stamp: no ctime", "pwself/data/datasets.py", "    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]", "    return [st.st_size, st.st_mtime_ns, st.st_ino]", CACHES),
 ("scan stamp: no size", "pwself/data/datasets.py", "    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]", "    return [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]", CACHES),
 ("feature key: no mean", "pwself/eval/source.py", '"mean": source.mean, "std"', '"std"', CACHES),
 ("feature key: no content", "pwself/eval/source.py", '"content": fingerprint(dataset),', '"content": None,', CACHES),
 ("warm-up: backbone learns at once", "pwself/schedules.py", "[i >= heads_only for i in range(total)] if heads_only else None", "None", ["tests/test_backbones.py"]),
 ("gram: anchor not detached", "pwself/losses.py", "a = F.normalize(at_least_fp32(anchor.detach()).to(s.dtype), dim=-1)", "a = F.normalize(at_least_fp32(anchor).to(s.dtype), dim=-1)", ["tests/test_backbones.py"]),
 ("gram: weight ignored", "pwself/step.py", '"loss": terms["loss"] + anchor.weight * gram}', '"loss": terms["loss"] + gram}', ["tests/test_backbones.py"]),
 ("layer decay: block rate off by one", "pwself/step.py", "        layer = int(rest.split(\".\")[1]) + 1", "        layer = int(rest.split(\".\")[1])", ["tests/test_backbones.py"]),
 ("loading: dinov2 head names not mapped", "pwself/init_weights.py", '"dino_head.": "head", ', "", ["tests/test_backbones.py"]),
]
TESTS = ["tests/test_losses.py", "tests/test_eval_references.py", "tests/test_augment.py", "tests/test_eval_suite.py",
         "tests/test_knn.py", "tests/test_dense.py", "tests/test_eval_metrics.py", "tests/test_distributed.py",
         "tests/test_step.py", "tests/test_train.py"]
def skip(folder, names):
    """What the scratch copy leaves out: the venv, git, run and data folders of the checkout's top, bytecode."""
    top = {".venv", ".git", "runs", "data", ".pwself_cache"} if Path(folder) == SRC else set()
    return [n for n in names if n in top or n.endswith(".pyc")]


only = sys.argv[1:]
caught: dict[str, list[int]] = {}
for name, f, old, new, *tests in [*BUGS, *NEW]:
    if only and not any(o in name for o in only):
        continue
    dst = Path(tempfile.mkdtemp(prefix="pwself_plant_")) / "tree"
    shutil.copytree(SRC, dst, ignore=skip)
    p = dst / f
    s = p.read_text()
    assert old in s, (name, old)
    p.write_text(s.replace(old, new))
    env = {"PYTHONPATH": str(dst), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                        *(tests[0] if tests else TESTS)], cwd=dst, env=env, capture_output=True, text=True)
    shutil.rmtree(dst.parent, ignore_errors=True)
    failed = sorted(set(re.findall(r"FAILED (\S+?)(?: - |$)", r.stdout, re.M)))
    print(f"{name}: {len(failed)} failed: {failed}", flush=True)
    area = caught.setdefault(name.split(":")[0], [0, 0])
    area[0] += bool(failed)
    area[1] += 1
print("\ncaught / planted per area: " + ", ".join(f"{a} {c}/{n}" for a, (c, n) in caught.items()))
