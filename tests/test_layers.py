"""The shape of the code: imports only go down the layers, no source file over 400 lines, and the
orchestration can be imported (and unit-tested) without Ray, vLLM or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the packages it must never import
FORBIDDEN = {
    "rollout": {"vespo"},
    "learner": {"vespo"},
    "buffer": {"vespo", "rollout", "learner"},
    "weightsync": {"vespo", "rollout", "learner", "buffer"},
    "configtypes": {"vespo", "rollout", "learner", "buffer", "weightsync"},
}
MAX_LINES = 400


def sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level packages a file imports (module level or inside functions), with line numbers."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upward(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sources(package)
        for name, line in sorted(imported_packages(path))
        if name in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_no_source_file_is_over_400_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sources(*FORBIDDEN, "vespo", "bench", "tests", "scripts")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vespo.controller import Controller\n")
    assert ("vespo", 2) in imported_packages(bad)


def test_the_orchestration_imports_without_ray_vllm_or_deepspeed():
    code = (
        "import sys; import vespo.controller, vespo.fleet, vespo.sources, vespo.weight_sync, vespo.run_state; "
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
