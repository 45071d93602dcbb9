"""The run folder has one owner: every file name a run writes is spelled in ``pwself/run/`` and nowhere else in
the code (package, scripts, benchmarks); the others ask :class:`pwself.run.folder.RunFolder`."""

import ast
import re
from pathlib import Path

import pytest

from pwself.run.folder import RUN_FILES, RUN_PATTERNS, RunFolder, run_owned

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "pwself" / "run"


def _name_pattern(name: str) -> str:
    if "*" in name:  # checkpoint_*.pt, matches_*.png: the stem, then a glob or a format field
        return r"(?<![\w.])" + re.escape(name.split("*")[0]) + r"_?(\*|\{|\[0-9\]|\.json)"
    if name == RunFolder.TENSORBOARD:  # a folder; `pwself[tensorboard]` and `log.tensorboard` are not it
        return r"^tensorboard/?$|(?<![\w.\[])tensorboard/"
    return r"(?<![\w.])" + re.escape(name) + r"(?!\w)"


SPELLINGS = re.compile("|".join(f"(?:{_name_pattern(n)})" for n in (*RUN_FILES, *RUN_PATTERNS,
                                                                      RunFolder.CHECKPOINT_LAST, "floor_*.json")))


def _strings(path: Path):
    """(line, text) of every string literal in ``path`` but docstrings; an f-string as its source text."""
    source = path.read_text()
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in ast.walk(node)
                       if v is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and id(node) not in inside_fstrings:
            yield node.lineno, ast.get_source_segment(source, node) or ""
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            yield node.lineno, node.value


def _code_files():
    for folder in ("pwself", "scripts", "benchmarks"):
        yield from (p for p in sorted((ROOT / folder).rglob("*.py")) if OWNER not in p.parents)


def test_no_run_file_name_is_spelled_outside_the_run_package():
    found = [f"{p.relative_to(ROOT)}:{line}: {text[:80]!r}" for p in _code_files() for line, text in _strings(p)
             if SPELLINGS.search(text)]
    assert found == [], "ask pwself.run.folder.RunFolder for these paths instead:\n" + "\n".join(found)


@pytest.mark.parametrize("text", ['"config.yaml"', '"knn.json"', 'f"checkpoint_{step:08d}.pt"', '"checkpoint_*.pt"',
                                  '"matches_*.png"', '"tensorboard"', 'f"floor_{name}.json"', '"checkpoint_last.pt"',
                                  '"tune_score.json"', 'f"tune_score_{metric}.json"', 'f"score_{protocol}.json"'])
def test_the_grep_finds_each_kind_of_spelling(text, tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(f'"""Docstrings may say config.yaml."""\nx = {text}\n')
    assert [t for _, t in _strings(planted) if SPELLINGS.search(t)] != []


@pytest.mark.parametrize("text", ['"fmnist_knn.json"', '"log.tensorboard=true"', '"pip install pwself[tensorboard]"',
                                  '"checkpoint_every_steps"', '"matches_grid.png"',
                                  '"start_dense.json"', '"floor_pixels_dense"'])
def test_the_grep_leaves_other_names_alone(text, tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(f'"""Docstrings may say config.yaml."""\nx = {text}\n')
    assert [t for _, t in _strings(planted) if SPELLINGS.search(t)] == []


def test_run_folder_paths_are_the_owned_files(tmp_path):
    run = RunFolder(tmp_path)
    run.config.write_text("seed: 0\n")  # a folder holds a run once its config is there
    owned = [run.config, run.metrics, run.knn, run.floors, run.finished, run.backbone, run.report_html,
             run.dense_history, run.floor("random_init"), run.checkpoint(12), run.checkpoint_last,
             run.figure("matches", 0), run.tensorboard, run.lock, run.tune_score("miou"), run.score("linear")]
    assert [p for p in owned if not run_owned(p)] == []
    assert run.checkpoint(12).name == "checkpoint_00000012.pt"
    assert not run_owned(tmp_path / "notes.md")
    run.write_json(RunFolder.KNN, {"knn": {"10": {"top1": 50.0}}})
    assert run.read_json(RunFolder.KNN) == {"knn": {"10": {"top1": 50.0}}} and run.read_json(RunFolder.FLOORS) is None
