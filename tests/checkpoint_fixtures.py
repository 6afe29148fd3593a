"""Fake checkpoints for the checkpoint tests: small files in the layout
learner.checkpoint.validate requires, written through prepare_staging + finalize, so the
writer's and the reader's rules are tested without Ray or DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from learner import checkpoint
from learner.checkpoint import CheckpointMeta

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
FILES = {  # relpath -> size: what the learner, the buffer and the controller put in a checkpoint
    "deepspeed/state/mp_rank_00_model_states.pt": 3000,
    "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000,
    "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt": 5000,
    "rng/rank_0.safetensors": 300,
    "rng/rank_1.safetensors": 300,
    "model/config.json": 0,  # JSON, written below
    "model/model.safetensors": 4000,
    "buffer/buffer.msgpack": 1000,
    "controller/state.json": 0,  # JSON, written below
}


def write_files(staged: Path, step: int, tag: str, stop_after: int | None = None) -> None:
    """The data files of a fake checkpoint; `tag` tells one write of a step from another."""
    for i, (rel, size) in enumerate(FILES.items()):
        path = staged / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".json"):
            data = json.dumps({"step": step, "tag": tag, "file": rel}).encode()
        else:
            data = (f"{rel}:{step}:{tag}:".encode() * (size // 8 + 1))[:size]
        if stop_after is not None and i == stop_after:
            with open(path, "wb") as f:  # half of one file written, then the writer hangs
                f.write(data[: len(data) // 2])
                f.flush()
                return
        path.write_bytes(data)


def write(root: Path, step: int, tag: str, keep: int = 0) -> Path:
    staged = checkpoint.prepare_staging(root, step)
    write_files(staged, step, tag)
    return checkpoint.finalize(root, CheckpointMeta(step, step, WORLD_SIZE, 2), keep=keep)


def tag_of(path: Path) -> str:
    return json.loads((path / "controller" / "state.json").read_text())["tag"]


def entries(root: Path) -> set[str]:
    return set(os.listdir(root))
