"""LD_PRELOAD for vLLM's CPU engine process: Intel OpenMP (libiomp5) and tcmalloc, as vLLM's
CPU install guide asks (it warns at start-up when either is missing).

The preload must be in the environment when a process starts, so it is set around the engine's
start only: vLLM spawns its engine-core process from there, which inherits it. The process that
starts the engine (a rollout actor, running rewards and perhaps the transformers fallback) keeps
its own environment, and the learner never sees it. A library not found is skipped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

PreloadLibs = Literal["auto", "off"]

# the usual places: the venv (the intel-openmp wheel), then distro and /usr/local installs
_DIRS = (
    os.path.join(sys.prefix, "lib"),
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# tcmalloc first, as vLLM's guide orders them; the Debian/Ubuntu package is libtcmalloc-minimal4
_LIBS = ("libtcmalloc_minimal.so.4", "libiomp5.so")
# OpenMP runtimes: vLLM refuses two in LD_PRELOAD, and preloads torch's libgomp itself when none is
_OPENMP = ("libiomp", "libgomp", "libomp")


def find_libs(dirs: tuple[str, ...] = _DIRS, names: tuple[str, ...] = _LIBS) -> list[str]:
    """The first existing path of each library in `names`; missing ones are left out."""
    found = []
    for name in names:
        path = next((os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))), None)
        if path is not None:
            found.append(path)
    return found


def ld_preload(mode: PreloadLibs, current: str, libs: list[str] | None = None) -> str:
    """`current` LD_PRELOAD with the found libraries put in front (mode "auto"), or unchanged
    ("off"). A library already listed is not added twice, nor an OpenMP runtime when one is."""
    if mode == "off":
        return current
    parts = [p for p in current.split(":") if p]
    added = []
    for lib in find_libs() if libs is None else libs:
        name = os.path.basename(lib)
        stem = name.split(".so")[0]
        if any(stem in os.path.basename(p) for p in parts):
            continue
        if any(o in stem for o in _OPENMP) and any(o in p for p in parts for o in _OPENMP):
            continue
        added.append(lib)
    return ":".join(added + parts)


@contextmanager
def engine_preload(mode: PreloadLibs) -> Iterator[str]:
    """LD_PRELOAD set for processes started inside the block, and restored after it (vLLM adds
    its own choice to this process's LD_PRELOAD while configuring; that is undone too)."""
    before = os.environ.get("LD_PRELOAD")
    value = ld_preload(mode, before or "")
    if value:
        os.environ["LD_PRELOAD"] = value
    try:
        yield value
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


def loaded_in_children(name: str, pid: int | None = None) -> bool:
    """Whether a process started by `pid` (default: this one), at any depth, has a library whose
    file name contains `name` mapped: the check that a preload reached vLLM's engine process."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/maps") as maps:
                if any(name in os.path.basename(line.split()[-1]) for line in maps if "/" in line):
                    return True
        except OSError:  # it ended meanwhile
            continue
    return False
