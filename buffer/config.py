"""Buffer configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class BufferConfig:
    capacity: int = 4096  # trajectories held at most; producers wait (or get BufferFull) beyond it
    max_staleness: int = 4  # versions; older groups are dropped or down-weighted
    stale_policy: Literal["drop", "downweight"] = "drop"
    downweight_decay: float = 0.5  # weight = decay ** (staleness - max_staleness) under "downweight"
    groups_per_step: int = 8  # groups the learner takes per version, for the admission rule

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {self.capacity}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.stale_policy not in ("drop", "downweight"):
            raise ValueError(f"stale_policy must be 'drop' or 'downweight', got {self.stale_policy!r}")
        if not 0 < self.downweight_decay <= 1:
            raise ValueError(f"downweight_decay must be in (0, 1], got {self.downweight_decay}")
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {self.groups_per_step}")
