"""Model-written Python, run where it can only compute: a fresh interpreter per call, in an empty
scratch directory that is deleted afterwards, under hard limits, with the escape routes refused.

Layers, outermost first (each catches what the next one misses):
- a user + network + PID namespace when this machine allows unprivileged `unshare`: no network
  at all, and no process outside the sandbox can even be named, let alone signalled;
- a new session, killed as a whole on the wall-clock limit, so nothing outlives a call;
- rlimits set by the child before the model's code runs: CPU, address space, file size,
  open files, and no new processes or threads (RLIMIT_NPROC 0; root is exempt from it, hence:)
- an audit hook (`sandbox_child._child_guard`), installed before the code runs, that refuses processes,
  sockets, native code loading and any file access outside the scratch directory, except reads
  of the interpreter's own library. Audit hooks are a tripwire, not a kernel boundary, which is
  why they sit inside the namespace and the limits rather than instead of them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from rollout.tools.base import ToolError
from rollout.tools.sandbox_child import _child_guard, _child_main

_isolation: list[str] | None = None  # the namespace wrapper this machine allows, probed once


async def isolation_prefix() -> list[str]:
    """`unshare` into new user, network and PID namespaces, or [] where the kernel forbids it.

    A shell sits between `unshare` and Python so that Python is not the namespace's init, whose
    default-action signals (SIGXCPU from the CPU limit) the kernel would ignore.
    """
    global _isolation
    if _isolation is None:
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        prefix = [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
                  "/bin/sh", "-c", '"$@"; exit $?', "sandbox"]  # fmt: skip
        works = False
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-I", "-c", "pass", env={}, start_new_session=True,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                works = await asyncio.wait_for(proc.wait(), 10) == 0
            finally:
                await _kill(proc)
        except (OSError, TimeoutError):
            pass
        _isolation = prefix if works else []
    return _isolation


class PythonSandbox:
    name = "python"
    description = (
        "Run a Python 3 program and get what it prints. Each call starts a fresh interpreter in an empty "
        "directory: no network, no files outside that directory, no subprocesses, limited CPU time and memory. "
        "The standard library is available; print the results you need."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "the program; use print() for output"}},
        "required": ["code"],
    }

    def __init__(self, cpu_s: float = 5.0, memory_mb: int = 512, wall_s: float = 10.0, output_chars: int = 4000,
                 file_mb: int = 16, open_files: int = 64, isolate: bool = True,
                 scratch_root: str | None = None):  # fmt: skip
        """`isolate=False` skips the namespaces even where the machine allows them; `scratch_root` is
        where the per-call scratch directories are made (the system's temp dir by default)."""
        self.cpu_s, self.memory_mb, self.wall_s, self.output_chars = cpu_s, memory_mb, wall_s, output_chars
        self.file_mb, self.open_files, self.isolate, self.scratch_root = file_mb, open_files, isolate, scratch_root

    async def call(self, arguments: dict[str, Any]) -> str:
        code = arguments.get("code") if isinstance(arguments, dict) else None
        if not isinstance(code, str) or not code.strip():
            raise ToolError('python: needs {"code": "<program>"}')
        return await self.run(code)

    async def run(self, code: str) -> str:
        prefix = await isolation_prefix() if self.isolate else []
        scratch = os.path.realpath(tempfile.mkdtemp(prefix="vespo-python-", dir=self.scratch_root))
        status_r, status_w = os.pipe()
        limits = [math.ceil(self.cpu_s), self.memory_mb << 20, self.file_mb << 20, self.open_files]
        argv = [*prefix, sys.executable, "-I", "-B", "-c", BOOT, scratch, str(status_w), *map(str, limits)]
        env = {"HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=scratch, env=env, start_new_session=True, pass_fds=(status_w,),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            os.close(status_w)
            status_w = -1
            try:
                out, err = await asyncio.wait_for(self._exchange(proc, code), self.wall_s)
            except TimeoutError:
                raise ToolError(f"python: wall-clock limit ({self.wall_s:g} s) exceeded") from None
            status = _read_status(status_r)
            return self._result(status, proc.returncode, bool(prefix), out, err)
        finally:
            if status_w >= 0:
                os.close(status_w)
            os.close(status_r)
            if proc is not None:
                await _kill(proc)
            shutil.rmtree(scratch, ignore_errors=True)

    async def _exchange(self, proc: asyncio.subprocess.Process, code: str) -> tuple[str, str]:
        assert proc.stdin and proc.stdout and proc.stderr
        cap = self.output_chars * 4 + 1024  # bytes; utf-8 is at most 4 per character
        try:
            proc.stdin.write(code.encode("utf-8", "surrogatepass"))
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        out, err = await asyncio.gather(_drain(proc.stdout, cap, keep_tail=False), _drain(proc.stderr, cap, True))
        await proc.wait()
        return out, err

    def _result(self, status: str, rc: int | None, isolated: bool, out: str, err: str) -> str:
        kind, _, detail = status.partition(" ")
        if kind == "denied":
            raise ToolError(f"python: not allowed: {detail}")
        if kind == "memory":
            raise ToolError(f"python: memory limit ({self.memory_mb} MB) exceeded")
        if kind == "fsize":
            raise ToolError(f"python: file size limit ({self.file_mb} MB) exceeded")
        if not kind:  # the interpreter died without reporting: a signal, or the model's own os._exit
            sig = -rc if rc is not None and rc < 0 else rc - 128 if isolated and rc and rc > 128 else None
            if sig in (signal.SIGXCPU, signal.SIGKILL):
                raise ToolError(f"python: CPU time limit ({self.cpu_s:g} s) exceeded")
            if sig == signal.SIGXFSZ:
                raise ToolError(f"python: file size limit ({self.file_mb} MB) exceeded")
            if sig:
                raise ToolError(f"python: the interpreter crashed ({signal.Signals(sig).name})")
            if rc:
                err = f"{err.rstrip()}\n(exit status {rc})"
        elif kind == "exit" and detail != "0":
            err = f"{err.rstrip()}\n(exit status {detail})"
        return _combine(out, err, self.output_chars)

    async def close(self) -> None:
        pass


async def _drain(stream: asyncio.StreamReader, cap: int, keep_tail: bool) -> str:
    """Read to EOF keeping at most `cap` bytes (the head, or the tail where a traceback ends)."""
    kept = b""
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > cap:
            kept = kept[-cap:] if keep_tail else kept[:cap]
    return kept.decode("utf-8", "replace")


def _combine(out: str, err: str, limit: int) -> str:
    """stdout first, then the end of stderr (where a traceback says what went wrong), in `limit` characters."""
    out, err = out.rstrip("\n"), err.strip("\n")
    if not out and not err:
        return "(no output)"
    mark = "[... truncated]"
    err_room = min(len(err), max(limit // 2, limit - len(out) - 1))
    out_room = max(0, limit - err_room - 1)
    if len(out) > out_room:
        out = out[: max(0, out_room - len(mark) - 1)] + "\n" + mark
    if len(err) > err_room:
        err = mark + "\n" + err[len(err) - max(0, err_room - len(mark) - 1) :]
    return "\n".join(part for part in (out, err) if part)


def _read_status(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    except BlockingIOError:
        return ""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the whole session of a child still running (on a limit or a cancel) and reap it.

    A child that exited on its own left nothing behind (no forks; in the namespace its init's
    death takes everything else along), and its group id may no longer be ours to signal.
    """
    if proc.returncode is None:
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    try:
        await asyncio.shield(proc.wait())
    except asyncio.CancelledError:
        await proc.wait()
        raise


BOOT = "\n\n".join(inspect.getsource(f) for f in (_child_guard, _child_main)) + "\n_child_main()\n"
