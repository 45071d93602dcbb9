"""Small-scale recipe search: each argument is ``NAME [key=value ...]`` (quoted), trained from
the shipped ``fmnist_demo`` config at the comparison budget (``epochs=1``: 600 steps) and scored by kNN (k = 10,
full 60k bank) of the teacher's CLS token and of its mean patch token. Finished runs are read back,
interrupted ones resume from their last checkpoint.

    python scripts/recipe_search.py "base" "lr2x optim.lr=8e-3" "loc views.local_scale=[0.2,0.5]"

Results go to ``runs/search/NAME/search.json`` and one line per run on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pwself
from pwself.config import load_config
from pwself.data import open_dataset
from pwself.eval import extract_features, knn_classify
from pwself.experiment import pretrain
from pwself.run.checkpoint import latest_checkpoint

OUT = Path("runs/search")


def main(specs: list[str]) -> None:
    for spec in specs:
        name, *overrides = spec.split()
        result_path = OUT / name / "search.json"
        if not result_path.exists():
            cfg = load_config("fmnist_demo", ["epochs=1", f"out_dir={OUT / name}", *overrides])
            run = pretrain(cfg, resume=latest_checkpoint(OUT / name) is not None, progress=False, overwrite=True)
            model = pwself.load(str(OUT / name))
            rc = run.config  # with the channel statistics the run measured
            feats = {split: extract_features(model, open_dataset(rc.data, split, rc.backbone.in_chans,
                                                                 rc.backbone.patch_size, rc.seed),
                                             rc.data.mean, rc.data.std, size=rc.views.global_size,
                                             pooling="mean-patch", progress=False)
                     for split in ("train", "test")}
            mean_patch = knn_classify(*feats["train"], *feats["test"], ks=(10,))[10]["top1"]
            result_path.write_text(json.dumps({"overrides": overrides, "cls": run.knn[10]["top1"],
                                               "mean-patch": mean_patch}))
        print(name, json.loads(result_path.read_text()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
