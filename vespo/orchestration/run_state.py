"""Checkpoint and resume of the run around the learner: step, policy version, the buffer, the
prompt stream, and the prompts in flight.

A checkpoint holds the learner (every rank), the exported model, a buffer snapshot and the
controller's state. The buffer is snapshotted first: the state then records exactly the
prompts handed out whose groups the snapshot does not hold, and a resumed run hands those out
again, so none is lost and none is trained twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import configtypes
from learner import checkpoint
from vespo.orchestration.prompts import PromptStream, PromptStreamState

log = logging.getLogger(__name__)


def save(run) -> Path:
    """Write a checkpoint of `run` (a Controller) under its checkpoint root; returns its path."""
    state = {"step": run.step, "version": run.weights.version, "config": configtypes.to_dict(run.cfg)}

    def snapshot_buffer(path: Path) -> None:
        # with it, the prompt stream's position and the prompts to hand out again, taken together
        state.update(run.fleet.resume_point(lambda: run.buffer.snapshot_seen_groups(path)))

    def write_state(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "state.json").write_text(json.dumps(state, indent=1))

    extra = {"buffer": snapshot_buffer, "controller": write_state}  # in this order
    return run.learner.save_checkpoint(run.checkpoint_root, run.step, run.weights.version, extra,
                                       run.cfg.train.keep_checkpoints)  # fmt: skip


def restore(run, found: Path) -> None:
    """Continue from checkpoint `found`: the learner's ranks, versions, the prompt stream, the
    prompts to hand out again; then the engines get the restored weights. The buffer was
    created from the checkpoint's snapshot already."""
    state = json.loads((found / "controller" / "state.json").read_text())
    meta = run.learner.load_checkpoint(found)
    if meta.step != state["step"]:
        raise checkpoint.CheckpointError(f"{found}: learner step {meta.step} != controller step {state['step']}")
    run.step = state["step"]
    samples = run.task.samples("train")
    run.prompts = PromptStream(samples, run.cfg.task.seed, PromptStreamState(**state["prompts"]))
    run.fleet.prompts = run.prompts
    requeue = [(gid, run.prompts.by_id[sid]) for gid, sid in state.get("requeue", [])]
    run.prompts.requeue(requeue)
    # the snapshot's admission count still holds the in-flight ones: they are admitted again
    run.buffer.abandon(len(requeue) - state.get("requeue_abandoned", 0))
    run.weights.publish(run.step)  # the engines started from the base model: give them the restored weights
    log.info("resumed from %s: step %d, %d group(s) in the buffer snapshot, %d in-flight prompt(s) requeued",
             found, run.step, run.buffer.metrics().get("buffer/ready_groups", 0), len(requeue))  # fmt: skip
