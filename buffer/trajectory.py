"""The trajectory record: what a rollout engine produces and the learner trains on.

One record is one sampled response to one prompt, or one multi-turn episode: then the
response interleaves the model's turns with the environment's messages (tool results,
observations), and `loss_mask` is 0 on the environment's tokens, which no objective ever sees;
their log-probs are 0 and their version tags -1. Versions are per token because partial
rollouts (generation interrupted by a weight update and resumed under the new weights) mix
policy versions inside a single response; staleness is measured on the oldest token.
For a Mixture-of-Experts model the engine also records the experts its router chose for every
token it ran through the model (`routed_experts`, one byte per layer and top-k slot), so the
learner can replay them. Records serialise to msgpack with numpy buffers as raw bytes: snapshots and transport never
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
    "loss_mask": np.uint8,
    "routed_experts": np.uint8,
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
    # (R,) uint8: 1 on the model's tokens (trained), 0 on an environment's; None means all 1
    loss_mask: np.ndarray | None = None
    # MoE routing as the engine ran it: (P + R - 1, layers, top_k) expert ids, row-major and flat,
    # for every token but the last (the one never fed back); empty for a dense model or an episode
    routed_experts: np.ndarray | None = None
    routing_shape: tuple[int, int] = (0, 0)  # (layers, top_k) of routed_experts

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = np.ones(len(self.response_ids), np.uint8)
        if self.routed_experts is None:
            self.routed_experts = np.zeros(0, np.uint8)
        self.routing_shape = tuple(self.routing_shape)
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        n = len(self.response_ids)
        if len(self.behavior_logprobs) != n or len(self.token_versions) != n or len(self.loss_mask) != n:
            raise ValueError(
                f"trajectory {self.traj_id}: {n} response tokens but {len(self.behavior_logprobs)} "
                f"log-probs, {len(self.token_versions)} version tags and {len(self.loss_mask)} mask entries"
            )
        ran, (layers, top_k) = max(len(self.prompt_ids) + n - 1, 0), self.routing_shape
        if len(self.routed_experts) not in (0, ran * layers * top_k):
            raise ValueError(
                f"trajectory {self.traj_id}: {len(self.routed_experts)} routed-expert entries, expected "
                f"{ran * layers * top_k} ({ran} tokens x {layers} layers x top-{top_k})"
            )

    def routing(self) -> np.ndarray | None:
        """The routed experts as (tokens, layers, top_k), or None without any."""
        if not len(self.routed_experts):
            return None
        return self.routed_experts.reshape(-1, *self.routing_shape)

    @property
    def model_tokens(self) -> int:
        """Response tokens the model sampled (an episode's environment tokens excluded)."""
        return int(self.loss_mask.sum())

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def oldest_version(self) -> int:
        """The version staleness is measured from: the oldest model token (or the start, if none)."""
        sampled = self.token_versions[self.loss_mask.astype(bool)]
        return int(sampled.min()) if len(sampled) else self.version_start

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
            if kwargs.get(name) is None:  # a snapshot written before that field existed
                continue
            kwargs[name] = np.frombuffer(kwargs[name], dtype=dtype).copy()
        return cls(**kwargs)

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, payload: bytes) -> Trajectory:
        return cls.from_dict(msgpack.unpackb(payload, raw=False))
