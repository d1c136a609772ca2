"""The package's shape: imports flow one way (errors <- spec <- model <- pipeline and output <-
commands <- cli), with no cycle, and only the pipeline runs Ray."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clipbatch"
# Which layers a layer may import from; a layer always may import itself.
ALLOWED = {"errors": set(), "spec": {"errors"}, "model": {"errors", "spec"},
           "output": {"errors", "spec", "model"}, "pipeline": {"errors", "spec", "model", "output"},
           "commands": {"errors", "spec", "model", "output", "pipeline"},
           "cli": {"errors", "spec", "commands", "pipeline"}, "remote": {"cli"}, "__init__": {"pipeline"}}
# Ray's Jobs API client (submit) talks to a cluster; it runs no Ray Data and starts no Ray.
RAY_OUTSIDE_PIPELINE = {"commands.submit"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imports(path: Path) -> set[str]:
    """Modules a file imports anywhere in it (clipbatch's without the prefix)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m.removeprefix("clipbatch.") if m.startswith("clipbatch.") else m for m in found}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_layers_import_only_downwards():
    wrong = []
    for name, path in MODULES.items():
        layer = name.split(".")[0]
        for imported in imports(path):
            target = imported.split(".")[0]  # a layer of clipbatch's, or a library
            if target in ALLOWED and target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {m for m in imports(path) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_only_the_pipeline_imports_ray():
    users = {name for name, path in MODULES.items() if any(m == "ray" or m.startswith("ray.")
                                                          for m in imports(path))}
    assert {u for u in users if not u.startswith("pipeline.")} == RAY_OUTSIDE_PIPELINE


def test_functions_and_modules_stay_readable():
    """No function over 60 lines and no module over 300, so that each reads on a screen or two."""
    long = []
    for name, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > 300:
            long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_lint_passes():
    """ruff, with the project's config (pyproject.toml): the README's test command lints too."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(PACKAGE.parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
