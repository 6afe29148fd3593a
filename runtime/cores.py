"""CPU core sets: how a role's cores are written in config, and how a process takes them.

Engines and learner ranks on one machine otherwise float over every core: overlapping
generation with training then only makes them compete, and each side's OpenMP pool spins on
cores the other needs. A role that owns its cores runs at its own speed whatever the other
does. It sits here, below every layer, because rollout and learner actors both apply it.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

from pydantic import Field

Cores = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # one process's cores


def pin_process(cores: list[int]) -> list[int]:
    """Bind every thread of this process (and so every thread and child process started later)
    to `cores`, and size the OpenMP pools to match; returns the cores now held.

    Every existing thread is bound, not just the caller: an actor's methods run on threads Ray
    started before its constructor, and a child (vLLM's engine process) inherits the mask of
    the thread that spawns it."""
    wanted = set(cores)
    missing = wanted - os.sched_getaffinity(0)
    if missing:
        raise ValueError(f"cores {sorted(missing)} are not available to this process ({_held()})")
    bind_threads(wanted)
    os.environ["OMP_NUM_THREADS"] = str(len(wanted))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(len(wanted))
    return sorted(os.sched_getaffinity(0))


def bind_threads(cores: set[int] | list[int]) -> set[int]:
    """Bind every thread of this process to `cores` (nothing else changes); returns the cores
    the calling thread held before, to bind back to."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass
    return before


def held_cores() -> list[int]:
    """The cores this thread may run on (what a role reports it holds)."""
    return sorted(os.sched_getaffinity(0))


def _held() -> str:
    return f"it has {held_cores()}"
