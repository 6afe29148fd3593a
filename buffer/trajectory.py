"""The trajectory record: what a rollout engine produces and the learner trains on.

One record is one sampled response to one prompt. Versions are per token because partial
rollouts (generation interrupted by a weight update and resumed under the new weights) mix
policy versions inside a single response; staleness is measured on the oldest token.
Records serialise to msgpack with numpy buffers as raw bytes: snapshots and transport never
unpickle anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

_ARRAYS = {
    "prompt_ids": np.int32,
    "response_ids": np.int32,
    "behavior_logprobs": np.float32,
    "token_versions": np.int32,
}


@dataclass
class Trajectory:
    traj_id: str  # unique per sample; the buffer uses it to prove nothing is lost or duplicated
    group_id: str  # all n samples of one prompt share it (GRPO advantages need whole groups)
    group_size: int  # n: how many samples the group will hold once complete
    prompt_ids: np.ndarray  # (P,) int32
    response_ids: np.ndarray  # (R,) int32
    behavior_logprobs: np.ndarray  # (R,) float32, log mu(y_t) from the engine that sampled y_t
    token_versions: np.ndarray  # (R,) int32, policy version each response token was sampled under
    version_start: int  # policy version when generation of this sample started
    version_end: int  # policy version when it finished
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    finish_reason: str = ""  # "stop", "length", "abort", ...
    engine_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: queue, generate, reward, ...
    extra: dict[str, Any] = field(default_factory=dict)  # msgpack-able task data (e.g. the answer)

    def __post_init__(self) -> None:
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        n = len(self.response_ids)
        if len(self.behavior_logprobs) != n or len(self.token_versions) != n:
            raise ValueError(
                f"trajectory {self.traj_id}: {n} response tokens but {len(self.behavior_logprobs)} "
                f"log-probs and {len(self.token_versions)} version tags"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def oldest_version(self) -> int:
        """The version staleness is measured from: the oldest token (or the start, if empty)."""
        return int(self.token_versions.min()) if len(self.token_versions) else self.version_start

    def staleness(self, current_version: int) -> int:
        return current_version - self.oldest_version()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tobytes() if f.name in _ARRAYS else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        kwargs = dict(data)
        for name, dtype in _ARRAYS.items():
            kwargs[name] = np.frombuffer(kwargs[name], dtype=dtype).copy()
        return cls(**kwargs)

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, payload: bytes) -> Trajectory:
        return cls.from_dict(msgpack.unpackb(payload, raw=False))
