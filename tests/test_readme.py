"""The README as a new user reads it (issue 28, items 6 and 7): every Python block runs as written, every
`pwself` command in it (and in docs/) parses with the CLI's own parser and its KEY=VALUE settings are real
keys, every `make` target exists, every file it points to is in the repository."""

import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pwself.cli import main, parse_args
from pwself.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _commands(path: Path) -> list[str]:
    """Every shell line of the bash blocks, continuations joined, comments dropped."""
    return _commands_of(path.read_text())


def _pwself_argv(line: str) -> list[str] | None:
    words = shlex.split(line.replace("$", "X"))
    if words[0] == "pwself":
        return words[1:]
    if "pwself.cli" in words:  # torchrun ... -m pwself.cli pretrain ...
        return words[words.index("pwself.cli") + 1:]
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_parses_and_its_settings_are_keys(doc, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/photos: a folder that does not exist, as on a new machine
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    checked = 0
    for line in _commands(doc):
        if line.startswith("make "):
            for part in line.split("&&"):
                words = part.split()
                if words and words[0] == "make":
                    assert set(words[1:]) <= targets, f"{doc.name}: `{part.strip()}`: no such make target"
            continue
        if line.startswith(("python ", "bash ", "scripts/")):
            script = next(w for w in line.split() if w.endswith((".py", ".sh")))
            assert (ROOT / script).is_file(), f"{doc.name}: `{line}`: {script} is not in the repository"
            continue
        argv = _pwself_argv(line)
        if argv is None:
            continue
        try:
            args = parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: `{line}` does not parse")
        if args.command in ("pretrain", "config"):  # the settings it gives must be real keys with valid values
            overrides = [a for a in argv if "=" in a and not a.startswith("-")]
            load_config(getattr(args, "config", None), overrides)
        checked += 1
    assert checked or doc.name != "README.md"


def _rgb_folder(root: Path, n: int = 8) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * k, 48, 3), dtype=np.uint8)).save(root / f"p{k}.jpg")


@pytest.mark.slow
def test_the_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    """The quickstart's path: a folder of RGB photos trained with the defaults (its own settings made small),
    loaded with timm's standard transform; then every Python block of the README, as written."""
    monkeypatch.chdir(tmp_path)
    _rgb_folder(tmp_path / "photos")
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(tmp_path / "photo.jpg")
    # The README's small-folder command (--config small_folder), its model and run made small.
    assert main(["pretrain", "--config", "small_folder", "data.root=photos", "--out-dir", "runs/mine",
                 "--steps", "3", "--batch-size", "4", "--no-progress", "views.global_size=32", "views.local_size=16",
                 "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=16",
                 "eval.knn_floors=false"]) == 0
    assert "backbone.in_chans=3 from the data" in capsys.readouterr().err
    blocks = _blocks(ROOT / "README.md", "python")
    assert len(blocks) >= 2
    for k, block in enumerate(blocks):
        script = tmp_path / f"block{k}.py"
        script.write_text(block)
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "torch.Size([1, 17, 32])" in out  # 32 px input: 16 patches of 8 px and the CLS token
    assert "'loss':" in out and "'n_match':" in out
    # The quickstart's export line, then the exported folder in timm's own loader with its standard transform.
    assert main(["export", "runs/mine", "--format", "folder", "runs/mine/model"]) == 0
    import timm
    import torch

    model = timm.create_model("local-dir:runs/mine/model", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = transform(Image.open("photo.jpg").convert("RGB"))[None]
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 17, 32)
    assert x.shape == (1, 3, 32, 32)


def test_the_readme_starts_with_the_two_commands_and_points_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    first = _commands(ROOT / "README.md")[:2]
    assert first == ["make demo", "make test"]
    assert text.index("make demo") < 600  # the two commands come first
    for ref in set(re.findall(r"`((?:docs|scripts|tests|benchmarks|pwself)/[\w./-]+)`", text)) | set(
            re.findall(r"\]\(((?:docs)/[\w./-]+)\)", text)):
        assert (ROOT / ref).exists(), f"README points at {ref}, which is not in the repository"
    for name in ("LICENSE", "RESULTS.md", "docs/algorithm.md"):
        assert (ROOT / name).is_file() and name in text
    assert "SPEC.md" not in text  # the algorithm is described inside the repository


@pytest.mark.slow
def test_the_start_from_dinov2_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's "Start from DINOv2 / DINOv3 weights" commands as written, on a shrunk file of the same
    architecture and a small folder of RGB photos; the settings after them only make the run small."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _rgb_folder(tmp_path / "photos")
    (tmp_path / "weights").mkdir()
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, embed_dim=32,
                              depth=2, num_heads=2)  # a 518 px file, as released
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights/model.safetensors"))
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**4. Start from DINOv2"):text.index("## What a run writes")]
    lines = [c for c in _commands_of(section) if c.startswith("pwself")]
    assert [w.split()[1] for w in lines] == ["pretrain", "export"]
    small = ["backbone.model_args={embed_dim: 32, depth: 2, num_heads: 2}", "views.global_size=28",
             "views.local_size=14", "views.n_local=2", "head.out_dim=16", "head.hidden_dim=32",
             "head.bottleneck_dim=16", "precision=fp32", "data.num_workers=0", "--epochs", "2", "--batch-size", "4",
             "--no-progress"]
    assert main(shlex.split(lines[0].replace("~", str(tmp_path)))[1:] + small) == 0
    assert "loaded 35 tensors from" in capsys.readouterr().err
    assert main(shlex.split(lines[1])[1:]) == 0
    cfg = json.loads((tmp_path / "runs/post/model/config.json").read_text())
    loaded = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, **cfg["model_args"],
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "runs/post/model/model.safetensors")))
    assert loaded.reg_token.shape == (1, 4, 32) and (tmp_path / "runs/post/model/heads.safetensors").is_file()
    with torch.no_grad():
        assert loaded.eval().forward_features(torch.rand(1, 3, 28, 28)).shape == (1, 5 + 4, 32)


def _commands_of(text: str) -> list[str]:
    """Every shell line of the bash blocks of a piece of Markdown, continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a comment after the command
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_the_readme_table_of_run_files_lists_every_file_a_run_writes():
    """The README's "What a run writes" against the run folder's own list (pwself.run.folder): every name or
    pattern there is in the table (a name may be covered by a pattern of the table, e.g. floor_*.json)."""
    import fnmatch

    from pwself.run.folder import RUN_FILES, RUN_PATTERNS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What a run writes"):]
    section = section[:section.index("\n## ", 5)]
    listed = [name for line in section.splitlines() if line.startswith("| `")
              for name in re.findall(r"`([^`/]+)/?`", line.split("|")[1])]
    missing = [f for f in (*RUN_FILES, *RUN_PATTERNS) if not any(f == n or fnmatch.fnmatch(f, n) for n in listed)]
    assert missing == [], f"add to the README's table of run files: {missing}"
