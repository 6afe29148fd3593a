"""Where a run's checkpoint keeps the controller's state, and in which order it is taken.

A checkpoint holds the learner (every rank), the exported model, a buffer snapshot and the
controller's state (`controller/state.json`). The buffer is snapshotted first: the state then
records exactly the prompts handed out whose groups the snapshot does not hold, and a resumed
run hands those out again, so none is lost and none is trained twice. What the state holds is
the controller's own business (Controller.checkpoint / Controller.restore); this module only
writes, reads and checks it against the learner's part.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learner import checkpoint

STATE_FILE = Path("controller") / "state.json"


def save(learner, root: Path, step: int, version: int, keep: int, snapshot_buffer: Callable[[Path], None],
         state: dict[str, Any]) -> Path:  # fmt: skip
    """Seal one checkpoint under `root`: the learner's ranks, then `snapshot_buffer(path)`, then
    the controller's `state`, written after the snapshot (which may add to it)."""

    def write_state(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / STATE_FILE.name).write_text(json.dumps(state, indent=1))

    extra = {"buffer": snapshot_buffer, "controller": write_state}  # in this order
    return learner.save_checkpoint(root, step, version, extra, keep)


def load(learner, found: Path) -> dict[str, Any]:
    """Load the learner's ranks from checkpoint `found` and return the controller's state, after
    checking that both parts are of the same step."""
    state = json.loads((found / STATE_FILE).read_text())
    meta = learner.load_checkpoint(found)
    if meta.step != state["step"]:
        raise checkpoint.CheckpointError(f"{found}: learner step {meta.step} != controller step {state['step']}")
    return state
