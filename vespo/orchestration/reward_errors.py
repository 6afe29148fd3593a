"""Samples whose reward failed: counted, reported once per kind, and fatal when they are nearly all.

A reward that fails marks its sample (the sample never trains). One failing sample is the
user's data or reward code having an edge case; nearly every sample of the first steps
failing is a broken reward (wrong import, wrong signature, a missing package in the engine's
environment), and waiting for a batch that can never train would only hide it. So the run
stops then, with the reward's own error text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from buffer.trajectory import Trajectory

log = logging.getLogger(__name__)


class RewardsFailing(RuntimeError):
    """Nearly every sample of the first steps failed its reward; the message has the first error."""


def kind_of(error: str) -> str:
    """'reward raised KeyError: 'x'' -> 'reward raised KeyError': errors of one kind, logged once."""
    return re.split(r"[:,(]", error, maxsplit=1)[0].strip()


class RewardErrors:
    def __init__(self, batch_samples: int, stop_fraction: float = 0.9, window_steps: int = 3):
        self.batch_samples = batch_samples  # at least one batch's worth is seen before judging
        self.stop_fraction = stop_fraction
        self.window_steps = window_steps  # only the first steps can stop the run
        self.seen = 0
        self.failed = 0
        self.kinds: dict[str, str] = {}  # kind -> its first message
        self.first: str | None = None

    def add(self, trajs: Sequence[Trajectory], step: int) -> int:
        """Count one batch's failures (returned); raises RewardsFailing when the early ones are nearly all."""
        errors = [t.extra["reward_error"] for t in trajs if "reward_error" in t.extra]
        self.seen += len(trajs)
        self.failed += len(errors)
        for error in errors:
            kind = kind_of(error)
            if kind not in self.kinds:
                self.kinds[kind] = error
                log.error("step %d: a sample's reward failed: %s (each further failure of this kind is only counted, "
                          "in faults/reward_errors; the sample does not train)", step + 1, error)  # fmt: skip
        if errors and self.first is None:
            self.first = errors[0]
        early = step < self.window_steps and self.seen >= self.batch_samples
        if early and self.failed >= self.stop_fraction * self.seen:
            raise RewardsFailing(
                f"{self.failed} of the first {self.seen} samples failed their reward, e.g. {self.first!r}; "
                "fix the reward (task.reward_fn, task.name) or the data before training"
            )
        return len(errors)
