"""Buffer configuration."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from configtypes import AtLeast0, AtLeast1, Positive, section


@section("buffer")
class BufferConfig:
    capacity: AtLeast1 = 4096  # trajectories held at most; producers wait (or get BufferFull) beyond it
    max_staleness: AtLeast0 = 4  # versions; older groups are dropped or down-weighted
    stale_policy: Literal["drop", "downweight"] = "drop"
    downweight_decay: Annotated[float, Field(gt=0, le=1)] = 0.5  # weight = decay ** (staleness - max_staleness)
    # nats per token of estimated KL(behaviour || current policy): the learner measures it by lag
    # and the cap tightens to the largest lag within it (buffer.divergence); None: the version cap alone
    divergence_budget: Positive | None = None
    # groups the learner takes per version, for the admission rule; unset, the run config
    # derives it from train.groups_per_step
    groups_per_step: AtLeast1 | None = None
    _derived: tuple[str, ...] = field(default=(), repr=False, compare=False)  # keys the run config filled in

    @property
    def admission_groups_per_step(self) -> int:
        """groups_per_step, or 1 for a buffer made without a run config: admission then assumes
        the slowest learner, so nothing it admits can outlive max_staleness."""
        return self.groups_per_step or 1
