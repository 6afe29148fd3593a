"""What goes into and comes out of a rollout engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from buffer.trajectory import Trajectory


@dataclass
class PromptItem:
    """One prompt to sample a group for. `text` is the rendered prompt (chat template applied);
    `answer` and `sample_id` travel to the reward function and into the trajectories."""

    group_id: str
    text: str
    answer: str = ""
    sample_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # copied into every trajectory's extra
    data_source: str = ""  # veRL's data_source and extra_info: for a compute_score reward only
    extra_info: dict[str, Any] | None = None


@dataclass
class Completion:
    """One sampled response as an engine returns it; versions are per token."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    version_start: int
    version_end: int
    # MoE: the experts the engine routed each token to, (prompt + response - 1, layers, top_k) uint8
    routed_experts: np.ndarray | None = None


@dataclass
class RolloutResult:
    """What one `generate` call produced: trajectories of the prompts that worked, and a clear
    error per prompt that did not (the actor keeps running)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # group_id -> reason
    refused: list[str] = field(default_factory=list)  # of errors, the prompts no retry can fix (PromptError)
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(t.response_ids) for t in self.trajectories)
