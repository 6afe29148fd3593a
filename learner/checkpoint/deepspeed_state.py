"""The parts of a checkpoint that need torch and DeepSpeed: a safe load of DeepSpeed's state
and each rank's RNG state. Kept apart from learner.checkpoint, so reading and validating
checkpoints stays standard library (importing DeepSpeed takes seconds).

DeepSpeed's files are torch pickles; they are read with weights_only=True and an allowlist of
the three DeepSpeed classes they hold, never with a general unpickler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import load_file, save_file

SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with the load made safe (weights_only)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def save_rng(path: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (path / "rng").mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "rng" / f"rank_{rank}.safetensors"))


def load_rng(path: Path, rank: int) -> None:
    state = load_file(str(path / "rng" / f"rank_{rank}.safetensors"))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
