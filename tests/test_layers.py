"""The shape of the code: imports only go down the layers, no import circles, no source file over
400 lines (an alarm, not a design rule), and the orchestration can be imported (and unit-tested)
without Ray, vLLM or DeepSpeed.

The layers, bottom up: configtypes < runtime < weightsync < buffer < learner, rollout < vespo,
and inside vespo: models < config < reporting < orchestration < commands.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configtypes", "runtime", "weightsync", "buffer", "learner", "rollout", "vespo")
VESPO_ROOMS = ("models", "config", "reporting", "orchestration", "commands")
# package (or vespo room) -> what it must never import
FORBIDDEN = {
    "configtypes": {"runtime", "weightsync", "buffer", "learner", "rollout", "vespo"},
    "runtime": {"weightsync", "buffer", "learner", "rollout", "vespo"},
    "weightsync": {"buffer", "learner", "rollout", "vespo"},
    "buffer": {"weightsync", "learner", "rollout", "vespo"},
    "learner": {"rollout", "vespo"},
    "rollout": {"learner", "vespo"},
    **{f"vespo/{room}": {f"vespo.{above}" for above in VESPO_ROOMS[i + 1 :]} for i, room in enumerate(VESPO_ROOMS)},
}
MAX_LINES = 400


def sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[tuple[str, int]]:
    """Modules a file imports (module level or inside functions), with line numbers; `from a import b`
    counts as importing a.b when a.b is a module of the project, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add((sub if is_module else node.module, node.lineno))
    return found


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_upward(layer):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sources(layer)
        for name, line in sorted(imported_modules(path))
        if any(is_under(name, above) for above in FORBIDDEN[layer])
    ]
    assert not bad, "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sources(*PACKAGES):
        here = module_of(path)
        graph[here] = {name for name, _ in imported_modules(path) if name.split(".")[0] in PACKAGES and name != here}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's __init__ that
    re-exports its own modules is not a circle: edges from a package to its own modules are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def edges(node: str) -> set[str]:
        return {m for m in graph.get(node, ()) if m in graph and not is_under(m, node)}

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_circle_finder_sees_a_circle():
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a": {"a.x"}, "b": set()}
    assert circles(graph) == [["a.x", "a.y", "a.z"]]


def test_no_source_file_is_over_400_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sources(*PACKAGES, "bench", "tests", "scripts")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vespo.orchestration.controller import Controller\n    import vespo.commands\n")
    assert imported_modules(bad) == {("vespo.orchestration.controller", 2), ("vespo.commands", 3)}


def test_the_orchestration_imports_without_ray_vllm_or_deepspeed():
    modules = ("controller", "fleet", "sources", "weight_publisher", "run_state")
    code = (
        f"import sys; import {', '.join(f'vespo.orchestration.{m}' for m in modules)}; "
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tests_stand_alone():
    """Shared helpers live in fixture modules (tests/*_fixtures.py, fakes.py), never in another test
    file, and what tests import from the project is packaged (pyproject's packages.find)."""
    packaged = set(PACKAGES) | {"bench"}
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    bad = []
    for path in sources("tests"):
        for name, line in sorted(imported_modules(path)):
            top = name.split(".")[0]
            if top.startswith("test_") or (top in local and top.startswith("test")):
                bad.append(f"{path.name}:{line} imports the test module {name}")
            elif (ROOT / top).is_dir() and top not in packaged and top != "tests":
                bad.append(f"{path.name}:{line} imports {name}, which is not packaged")
    assert not bad, "\n".join(bad)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{p}*"' in pyproject for p in packaged)
