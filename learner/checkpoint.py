"""Checkpoints that resume a run exactly, written atomically and loaded without unpickling code.

Layout of one checkpoint, root/step_00000042/:
    deepspeed/   DeepSpeed's own per-rank model, optimizer and scheduler state
    rng/         each rank's torch RNG state (safetensors)
    model/       the full weights as a Hugging Face directory (safetensors), for export
    buffer/      the replay buffer's snapshot, when the caller supplies one
    meta.json    step, policy version and layout, written last
Everything is written into step_XXXXXXXX.tmp and renamed into place, then root/latest is
replaced atomically: a crash leaves either the old or the new checkpoint, never half of one.
DeepSpeed's files are torch pickles; they are read with weights_only=True and an allowlist of
the three DeepSpeed classes they hold, so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
DEEPSPEED_TAG = "state"
LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from; the message says why."""


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with the load made safe (weights_only)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class CheckpointMeta:
    step: int
    policy_version: int
    world_size: int
    zero_stage: int
    format: int = 1


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def staging_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}.tmp"


def export_hf(state_dict: dict[str, torch.Tensor], source_model_dir: str | Path, out_dir: Path) -> None:
    """Write full weights as a Hugging Face model directory next to the source's config and tokenizer."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(source_model_dir).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(item, out_dir / item.name)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}  # clone: no shared storage
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def finalize(root: str | Path, meta: CheckpointMeta) -> Path:
    """Seal a staged checkpoint: meta.json last, rename into place, then point `latest` at it."""
    staged, final = staging_dir(root, meta.step), step_dir(root, meta.step)
    _write_atomic(staged / META, json.dumps(asdict(meta), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    _write_atomic(Path(root) / LATEST, final.name)
    return final


def latest(root: str | Path) -> Path:
    """The newest complete checkpoint under root (or root itself if it is one), validated."""
    root = Path(root)
    if (root / META).exists() or (root / "deepspeed").exists():
        return validate(root)
    pointer = root / LATEST
    if not pointer.exists():
        raise CheckpointError(f"no checkpoint under {root}: there is no '{LATEST}' file")
    return validate(root / pointer.read_text().strip())


def validate(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is a partial checkpoint (its write never finished)")
    try:
        meta = read_meta(path)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {META} (partial or corrupt): {err}") from err
    ds_dir = path / "deepspeed" / DEEPSPEED_TAG
    if not ds_dir.is_dir() or not any(ds_dir.iterdir()):
        raise CheckpointError(f"checkpoint {path} lacks its DeepSpeed state in {ds_dir}")
    missing = [r for r in range(meta.world_size) if not (path / "rng" / f"rank_{r}.safetensors").exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the RNG state of rank(s) {missing}")
    return path


def read_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((path / META).read_text()))


def save_rng(path: Path, rank: int) -> None:
    from safetensors.torch import save_file

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (path / "rng").mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "rng" / f"rank_{rank}.safetensors"))


def load_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path / "rng" / f"rank_{rank}.safetensors"))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
