"""The package's imports point one way. Each module has a layer; a module imports only from its own layer or
below (lazy imports inside functions and TYPE_CHECKING imports count too: they are dependencies all the same),
and no import cycle exists between modules, inside a layer either."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pwself"

# Lowest first. The order the brief asks for: cli -> experiments -> {train, eval} -> step -> objectives -> core,
# with data and runtime at the bottom.
LAYERS = {
    0: ["sections", "masking", "runtime", "run", "run.folder", "data.photos", "losses", "matching", "views", "augment",
        "diagnostics", "models", "eval.metrics", "eval.registry", "eval.during", "eval.linear"],
    1: ["data", "data.kinds", "data.datasets", "data.crops", "data.dense", "data.scenes"],
    2: ["objectives", "objectives.base", "objectives.dino", "objectives.patchwise", "objectives.cossl",
        "objectives.logo", "objectives.bagssl", "objectives.ibot"],
    3: ["config", "schedules", "loggers", "run.checkpoint", "run.state", "init_weights"],
    4: ["step"],
    5: ["train", "export", "eval", "eval.features", "eval.knn", "eval.source", "eval.dense", "eval.copydetect",
        "eval.retrieval", "eval.incontext", "eval.protocols", "eval.floors", "eval.suite", "viz", "report"],
    6: ["experiment", "compare", "tune"],
    7: ["cli", ""],  # "" is the package itself (pwself.load, pwself.pretrain)
}
def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every pwself module ``path`` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pwself":
            base = node.module.removeprefix("pwself").lstrip(".")
            for alias in node.names:  # `from pwself import x`: x may be a module
                sub = f"{base}.{alias.name}".lstrip(".")
                out.add(sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG / sub.replace(".", "/")).is_dir() else base)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("pwself").lstrip(".") for a in node.names
                       if a.name.split(".")[0] == "pwself")
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(PKG.rglob("*.py"))}


def _layer(module: str) -> int:
    for level, names in LAYERS.items():
        if module in names:
            return level
    raise AssertionError(f"pwself.{module} has no layer in tests/test_layers.py: give it one")


def test_every_module_has_a_layer_and_imports_point_down():
    upward = sorted((m, d) for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert upward == [], f"imports against the layer order (module, imported): {upward}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, m, d])}")
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_package_never_imports_the_peers_it_is_measured_against():
    """lightly is a test and benchmark extra (``[peers]``): an import of it in the package would make it a runtime
    need that ``pip install pwself`` does not install."""
    peers = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                   if isinstance(node, (ast.Import, ast.ImportFrom))
                   and any((n or "").split(".")[0] == "lightly"
                           for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])))
    assert peers == []
