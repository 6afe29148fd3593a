"""Claiming a run directory, so a new run never writes over an old one.

Every run shares `train.output_dir` by default, and checkpoints, wandb files and the resume
pointer all live under it: a second `vespo train` started from the same folder would mix its
checkpoints with the first run's and, at the same step number, replace them. A run therefore
claims its directory with a marker file before anything starts, and a directory that holds a
run (a marker, or checkpoints) is refused unless the user resumes it or says `--overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from learner.checkpoint import write_atomic

MARKER = "vespo-run.json"
OWNED = ("checkpoints", "wandb", MARKER)  # what --overwrite removes: only what a run writes


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message says what to do instead."""


def describe(output: Path) -> str | None:
    """What run `output` holds, in a few words, or None when it holds none."""
    marker = output / MARKER
    checkpoints = output / "checkpoints"
    steps = sorted(p.name for p in checkpoints.glob("step_*")) if checkpoints.is_dir() else []
    if not marker.exists() and not steps:
        return None
    started = ""
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            started = f"started {info.get('started', '?')} by pid {info.get('pid', '?')} on {info.get('host', '?')}"
        except (OSError, ValueError):
            started = "its marker is unreadable"
    ckpt = f"newest checkpoint {steps[-1]}" if steps else "no checkpoint yet"
    return ", ".join(x for x in (started, ckpt) if x)


def check(output: Path, overwrite: bool = False, resuming: bool = False) -> None:
    """Raise RunDirError when `output` holds a run this one may not take over. Cheap: it runs
    before anything starts, so a refused run exits in well under a second."""
    held = describe(output)
    if held and not (overwrite or resuming):
        raise RunDirError(
            f"train.output_dir {output} already holds a run ({held}); continue it with "
            f"`vespo train --resume {output / 'checkpoints'}`, pick another train.output_dir=..., "
            "or pass --overwrite to replace it"
        )


def claim(output: Path, overwrite: bool = False, resuming: bool = False) -> None:
    """Take `output` for this run (check first). Resuming continues the run that is there (the
    marker records the resume); `overwrite` removes the old run's checkpoints, wandb files and
    marker, nothing else in the folder."""
    check(output, overwrite, resuming)
    if describe(output) and overwrite and not resuming:
        for name in OWNED:
            path = output / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), "host": socket.gethostname()}
    marker = output / MARKER
    history = []
    if resuming and marker.exists():
        try:
            history = json.loads(marker.read_text()).get("resumes", [])
        except (OSError, ValueError):
            history = []
        history.append(record)
        record = {**record, "resumes": history}
    write_atomic(marker, json.dumps(record, indent=1))


def release(output: Path) -> None:
    """Give the directory back when the run ended before its first checkpoint: nothing there
    can be resumed, and the next attempt should not have to say --overwrite."""
    checkpoints = output / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
        (output / MARKER).unlink(missing_ok=True)
