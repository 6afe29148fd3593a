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
import re
import shutil
import socket
import time
from pathlib import Path

from learner.checkpoint import write_atomic, written_here

MARKER = "vespo-run.json"
# What --overwrite removes: only what a run wrote. In checkpoints/, what the checkpoint writer
# says is its own (sealed checkpoints, the pointer, leftovers of a crash); in wandb/, wandb's run
# directories, its latest-run link and its debug logs. Anything else there (a user's notes, a
# copied model) stays.
WANDB_OWNED = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-.+|latest-run|debug(?:-internal|-cli\..+)?\.log")
OWNED = {"checkpoints": written_here, "wandb": lambda entry: WANDB_OWNED.fullmatch(entry.name) is not None}


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
    marker records the resume); `overwrite` removes the old run's checkpoints, wandb runs and
    marker (see OWNED), nothing else in the folder."""
    check(output, overwrite, resuming)
    if describe(output) and overwrite and not resuming:
        remove_run(output)
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


def remove_run(output: Path) -> None:
    """Remove what a run wrote into `output` (OWNED), and checkpoints/ and wandb/ themselves
    if nothing else is left in them. A symlinked checkpoints/ (say, to a larger disk) is
    cleared the same way and kept; a symlink inside is removed, never followed."""
    for folder, ours in OWNED.items():
        top = output / folder
        if not top.is_dir():
            continue
        for entry in top.iterdir():
            if not ours(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if not top.is_symlink() and not any(top.iterdir()):
            top.rmdir()
    (output / MARKER).unlink(missing_ok=True)


def release(output: Path) -> None:
    """Give the directory back when the run ended before its first checkpoint: nothing there
    can be resumed, and the next attempt should not have to say --overwrite."""
    checkpoints = output / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
        (output / MARKER).unlink(missing_ok=True)
