"""The tools a model may call, run for real: the calculator, the Python sandbox (each escape a
model might try ends in a one-line refusal, with no process and no scratch directory left
behind), MCP servers over stdio (tests/mcp_echo_server.py, started as a process) and the
registry that opens them by name.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from rollout.tools.base import ToolError, schema
from rollout.tools.calculator import Calculator
from rollout.tools.mcp_tools import open_mcp_tools
from rollout.tools.python_sandbox import PythonSandbox, _child_main, isolation_prefix
from rollout.tools.registry import check_tool_specs, open_tools

SERVER = f"{sys.executable} {Path(__file__).with_name('mcp_echo_server.py')}"


def run(coro):
    return asyncio.run(coro)


_before: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before():
    """The test process's children before each test: earlier tests in the same process may keep
    theirs (wandb's service, a Ray driver's helpers); only children a test adds are its own."""
    _before.clear()
    _before.update(p.pid for p in psutil.Process().children(recursive=True))


def new_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _before]


def no_children_left() -> None:
    _, alive = psutil.wait_procs(new_children(), timeout=3)  # a killed child may still be on its way out
    assert not alive, f"processes left behind: {alive}"


# ---- calculator ----


@pytest.mark.parametrize(
    ("expression", "value"),
    [("17 * 24", "408"), ("6 / 3", "2"), ("1 / 3", "0.333333333333"), ("2 ** 10", "1024"), ("-(3 + 4) * 2", "-14"),
     ("7 // 2", "3"), ("7 % 3", "1"), ("+5", "5"), ("2 ** 0.5", "1.41421356237"), ("1e3", "1000"),
     ("2 ** -2", "0.25"), (" ( 1 + 2 ) ", "3")],
)  # fmt: skip
def test_calculator_evaluates(expression: str, value: str) -> None:
    assert run(Calculator().call({"expression": expression})) == value


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"expression": "__import__('os').system('ls')"}, "function calls"),
     ({"expression": "x + 1"}, "name 'x'"),
     ({"expression": "(1).real"}, "attribute .real"),
     ({"expression": "[1, 2]"}, "not allowed"),
     ({"expression": "'a' * 3"}, "only numbers"),
     ({"expression": "1 / 0"}, "division by zero"),
     ({"expression": "5 % 0"}, "division by zero"),
     ({"expression": "9 ** 9 ** 9"}, "exponent 387420489 is too large"),
     ({"expression": "10 ** 999 * 10"}, "more than 1000 digits"),
     ({"expression": "10.0 ** 400"}, "too large"),
     ({"expression": "(-8) ** 0.5"}, "not a real number"),
     ({"expression": "1 +"}, "not an arithmetic expression"),
     ({"expression": 5}, "needs {\"expression\""),
     ({}, "needs {\"expression\"")],
)  # fmt: skip
def test_calculator_refuses(arguments: dict, message: str) -> None:
    with pytest.raises(ToolError, match="^calculator: ") as refused:
        run(Calculator().call(arguments))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_calculator_schema() -> None:
    function = schema(Calculator())["function"]
    assert function["name"] == "calculator" and function["parameters"]["required"] == ["expression"]


# ---- python sandbox ----


def sandbox(tmp_path: Path, **limits) -> PythonSandbox:
    return PythonSandbox(**{"cpu_s": 1, "memory_mb": 256, "wall_s": 5, "scratch_root": str(tmp_path), **limits})


def run_code(tmp_path: Path, code: str, **limits) -> str:
    """The sandbox's answer (or its refusal as "ToolError: ..."), checked to leave nothing behind."""
    try:
        answer = run(sandbox(tmp_path, **limits).call({"code": code}))
    except ToolError as err:
        answer = f"ToolError: {err}"
    no_children_left()
    assert list(tmp_path.iterdir()) == [], "the scratch directory outlived the call"
    return answer


def test_sandbox_prints_and_keeps_files_in_scratch(tmp_path: Path) -> None:
    code = """
import json, pathlib, tempfile, asyncio
pathlib.Path("notes.txt").write_text("kept")
with tempfile.NamedTemporaryFile("w", delete=False) as f:
    f.write("x")
async def answer():
    await asyncio.sleep(0)
    return 6 * 7
print(json.dumps({"answer": asyncio.run(answer()), "notes": open("notes.txt").read()}))
"""
    assert run_code(tmp_path, code) == '{"answer": 42, "notes": "kept"}'


def test_sandbox_shows_tracebacks(tmp_path: Path) -> None:
    syntax = run_code(tmp_path, "print(")
    assert "print(" in syntax and syntax.endswith("SyntaxError: '(' was never closed")
    runtime = run_code(tmp_path, "print('before')\ndef f():\n    return 1 / 0\nf()")
    assert runtime.startswith("before\nTraceback") and "line 3, in f" in runtime
    assert runtime.endswith("ZeroDivisionError: division by zero")
    assert run_code(tmp_path, "import sys\nprint('bye')\nsys.exit(3)") == "bye\n(exit status 3)"


def test_sandbox_truncates_output(tmp_path: Path) -> None:
    out = run_code(tmp_path, "print('x' * 100000)", output_chars=200)
    assert len(out) <= 200 and out.startswith("xxx") and out.endswith("[... truncated]")


ESCAPES = [
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "not allowed: os.fork"),
    ("10 GB", "x = bytearray(10 * 1024**3)", "memory limit (256 MB) exceeded"),
    ("read /etc/passwd", "print(open('/etc/passwd').read())", "not allowed: open('/etc/passwd')"),
    ("socket", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "not allowed: network access"),
    ("subprocess", "import subprocess\nsubprocess.run(['ls'])", "not allowed: subprocess.Popen(['ls'])"),
    ("os.system", "import os\nos.system('ls')", "not allowed: os.system(b'ls')"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).system(b'ls')", "not allowed: import ctypes"),
    ("threads", "import threading\nthreading.Thread(target=print).start()", "not allowed: threads"),
    ("signal others", "import os\nos.kill(1, 9)", "not allowed: os.kill"),
    ("list /", "import os\nprint(os.listdir('/'))", "not allowed: os.listdir('/')"),
    ("climb out", "print(open('../../etc/passwd').read())", "not allowed: open('../../etc/passwd')"),
    ("raise limits", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (99, 99))",
     "not allowed: resource.setrlimit"),
    ("reach the guard", "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
     "    while tb.tb_next:\n        tb = tb.tb_next\n    print(tb.tb_frame.f_locals)",
     "not allowed: a traceback frame of the sandbox itself"),
    ("cpu loop", "while True:\n    pass", "CPU time limit (1 s) exceeded"),
    ("sleep", "import time\ntime.sleep(100)", "wall-clock limit (1 s) exceeded"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "refusal"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_sandbox_refuses_escapes(tmp_path: Path, code: str, refusal: str) -> None:
    assert run_code(tmp_path, code, wall_s=1 if "sleep" in code else 5) == f"ToolError: python: {refusal}"


def test_sandbox_write_outside_scratch_leaves_no_file(tmp_path: Path) -> None:
    target = Path(f"/tmp/escape_{uuid.uuid4().hex}")
    answer = run_code(tmp_path, f"open({str(target)!r}, 'w').write('escaped')")
    assert answer == f"ToolError: python: not allowed: open({str(target)!r})" and not target.exists()


def test_sandbox_refuses_without_namespaces_too(tmp_path: Path) -> None:
    """The rlimits and the audit hook alone, as on a machine that forbids unprivileged `unshare`."""
    for _, code, refusal in [ESCAPES[0], ESCAPES[2], ESCAPES[3], ESCAPES[-2]]:
        assert run_code(tmp_path, code, isolate=False) == f"ToolError: python: {refusal}"


def test_sandbox_cancelled_call_leaves_nothing(tmp_path: Path) -> None:
    """A step timeout cancels the call from outside: the child still dies and the scratch goes."""
    with pytest.raises(TimeoutError):
        run(asyncio.wait_for(sandbox(tmp_path).call({"code": "import time\ntime.sleep(100)"}), 0.5))
    no_children_left()
    assert list(tmp_path.iterdir()) == []


def test_sandbox_refuses_bad_arguments_and_probes_once(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match='needs {"code"'):
        run(sandbox(tmp_path).call({"program": "print(1)"}))
    prefix = run(isolation_prefix())
    assert prefix == [] or "--net" in prefix  # whatever the machine allows, decided once
    assert run(isolation_prefix()) is prefix


def test_sandbox_runner_frame_holds_nothing_the_guard_uses() -> None:
    """The model can read the runner's frame (sys._getframe); the guard's state must not be in it."""
    assert _child_main.__code__.co_cellvars == () and _child_main.__code__.co_freevars == ()


# ---- MCP ----


def test_mcp_tools_list_call_fail_and_close() -> None:
    async def scenario() -> None:
        tools = await open_mcp_tools(SERVER, timeout_s=30)
        add, fail = sorted(tools, key=lambda t: t.name)
        assert (add.name, fail.name) == ("add", "fail") and add.description == "Add two integers."
        assert add.parameters["required"] == ["a", "b"] and add.parameters["properties"]["a"]["type"] == "integer"
        assert await add.call({"a": 2, "b": 40}) == "42"
        assert await asyncio.create_task(add.call({"a": 1, "b": 2})) == "3"  # from a task of its own
        assert await asyncio.gather(*(add.call({"a": i, "b": i}) for i in range(3))) == ["0", "2", "4"]
        with pytest.raises(ToolError, match="^fail: ") as refused:
            await fail.call({"reason": "boom"})
        assert "\n" not in str(refused.value)
        with pytest.raises(ToolError, match="^add: .*validation error"):
            await add.call({"a": "x"})
        (server,) = new_children()
        await add.close()
        assert server.is_running()  # fail still uses it
        await fail.close()
        await fail.close()
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
        with pytest.raises(ToolError, match="closed"):
            await add.call({"a": 1, "b": 1})

    run(scenario())
    no_children_left()


def test_mcp_server_that_fails_to_start() -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        run(open_mcp_tools("/nonexistent/mcp-server --stdio", timeout_s=10))
    with pytest.raises(RuntimeError, match="failed to start"):
        run(open_mcp_tools(f"{sys.executable} -c 'print(1)'", timeout_s=10))
    no_children_left()


# ---- registry ----


def test_check_tool_specs() -> None:
    check_tool_specs(["calculator", "python", f"mcp:{SERVER}"])
    with pytest.raises(ValueError, match="unknown tool 'abacus'; the tools are calculator, python, or 'mcp:"):
        check_tool_specs(["abacus"])
    with pytest.raises(ValueError, match="names no MCP server command"):
        check_tool_specs(["mcp:  "])
    with pytest.raises(ValueError, match="listed twice"):
        check_tool_specs(["python", "python"])
    no_children_left()  # checking starts nothing


def test_open_tools() -> None:
    async def scenario() -> None:
        tools = await open_tools(["calculator", "python", f"mcp:{SERVER}"], timeout_s=30)
        by_name = {t.name: t for t in tools}
        assert sorted(by_name) == ["add", "calculator", "fail", "python"]
        assert await by_name["calculator"].call({"expression": "2 + 2"}) == "4"
        assert await by_name["add"].call({"a": 2, "b": 2}) == "4"
        for tool in tools:
            await tool.close()

    run(scenario())
    no_children_left()


def test_open_tools_refuses_duplicate_names_and_stops_servers() -> None:
    with pytest.raises(ValueError, match="two tools are named 'add', 'fail'"):
        run(open_tools([f"mcp:{SERVER}", f"mcp:{sys.executable} -u {SERVER.split()[1]}"], timeout_s=30))
    no_children_left()
