"""The package's shape, kept true by tests: short functions, one home per objective name, DDP for gradients."""

import ast
from pathlib import Path

import pytest

from pwself.objectives import OBJECTIVES

PACKAGE = Path(__file__).parent.parent / "pwself"
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert not long


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_an_objective_name_is_a_literal_in_at_most_two_files_outside_eval(name):
    files = set()
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "eval":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == name:
                files.add(str(rel))
    assert len(files) <= 2, files
    assert "objectives/__init__.py" in files  # the registry is where a name is defined


def test_gradients_are_synchronised_by_ddp_without_private_torch_helpers():
    sources = {str(p.relative_to(PACKAGE)): p.read_text() for p in _modules()}
    assert not [f for f, s in sources.items() if "torch._utils" in s or "_flatten_dense_tensors" in s]
    assert "DistributedDataParallel(model" in sources["step.py"]
