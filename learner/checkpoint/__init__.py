"""Checkpoints that resume a run exactly, sealed with a checksummed manifest, loaded without
unpickling code, and written so that no crash ever leaves `latest` without a complete checkpoint.

Layout of one checkpoint, root/step_00000042/:
    deepspeed/   DeepSpeed's own per-rank model, optimizer and scheduler state
    rng/         each rank's torch RNG state (safetensors)
    model/       the full weights as a Hugging Face directory (safetensors), for export
    adapter/     under learner.lora: the adapter in PEFT's format, and deepspeed/ holds no base
                 weight (learner.checkpoint.adapter)
    buffer/      the replay buffer's snapshot, when the caller supplies one
    controller/  the controller's state.json, when the caller supplies one
    meta.json    step, policy version, layout and the manifest: every other file's size and
                 sha256. Written last: a directory without it was never sealed.
A step written again (a run resumed from an older step reaches it a second time) goes to
step_00000042.r1, .r2, ...: a name is never reused while its old contents exist, so the old
checkpoint stays whole until the new one is sealed and `latest` names it. Checkpoints are
ordered by (step, revision).

One module per job: `writer` (staging, sealing, pruning, and the crash-safe order of it all),
`reader` (names, the pointer, the manifest and its verification) and `deepspeed_state`
(DeepSpeed's safe load and the RNG state, the only one that imports torch). This face
re-exports the first two, standard library only: `vespo eval`, `vespo train --resume` and the
crash tests read checkpoints without importing torch or DeepSpeed.
"""

from __future__ import annotations

from learner.checkpoint.reader import (
    LATEST,
    CheckpointError,
    CheckpointMeta,
    checkpoint_root,
    forget_verified,
    latest,
    list_checkpoints,
    parse_name,
    read_meta,
    validate,
)
from learner.checkpoint.writer import finalize, prepare_staging, prune, write_atomic, written_here

__all__ = [
    "LATEST",
    "CheckpointError",
    "CheckpointMeta",
    "checkpoint_root",
    "finalize",
    "forget_verified",
    "latest",
    "list_checkpoints",
    "parse_name",
    "prepare_staging",
    "prune",
    "read_meta",
    "validate",
    "write_atomic",
    "written_here",
]
