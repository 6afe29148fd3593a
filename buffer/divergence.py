"""Staleness measured in nats: how far the learner finds data of each lag from its policy.

The learner reports, each step, the mean per-token KL(mu || pi) of its batch's response
tokens by lag (learner version minus the version that sampled the token), as a {lag: KL}
mapping (learner.step_result.StepResult.kl_by_lag). `DivergenceEstimate` smooths those into
one estimate per lag and turns a budget in nats per token into a staleness cap: the largest
lag whose estimate, and every fresher lag's, stays within the budget. The buffer then admits
and keeps nothing older than that (buffer.replay.ReplayBuffer.set_staleness_cap), inside the
version cap `buffer.max_staleness`, which stays the outer bound.

Pure bookkeeping, no I/O: the controller feeds it the learner's KL by lag after every step.

- Smoothing: an exponential moving average per lag, a new measurement weighing `weight`
  (0.3: a lag's estimate follows a change within a few steps, and one noisy batch moves it by
  a third of its error). A lag's first measurement initialises it.
- Lags not measured: from the nearest measured lag j below, through the origin, est(L) =
  est(j) * L / j (drift grows about linearly with the number of updates between sampling and
  training, and a batch of lags 0..1 says nothing more about lag 3). Lag 0 is no base for
  that: its KL is the engine/learner mismatch, not drift, so above a lone lag 0 nothing is
  known and only the version cap holds; the first batch of older data then measures it.
- Monotone: the cap compares the running max of the estimates over lags 0..L, so a noisy dip
  at one lag does not admit data older than a lag already over budget.
- Forgetting: the cap keeps data of an over-budget lag out of the batches, so that lag is
  never measured again. An estimate not refreshed for `max_age` steps is dropped (then
  extrapolated, or unknown), which lets the cap reopen once the fresher lags say it may, and
  the data it admits measures the lag anew. Without it a cap, once tightened, could never loosen.
- Loosening is gradual: given the cap in force, the cap grows by at most one version a step
  (and falls at once), so a lag is admitted only after the one fresher than it was measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class DivergenceEstimate:
    """Per-lag moving averages of the KL the learner measured, and the cap a budget allows."""

    weight: float = 0.3  # share of a new measurement in a lag's moving average
    max_age: int = 10  # steps an estimate is kept without a new measurement of its lag
    _ema: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _measured_at: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # lag -> step
    _steps: int = field(default=0, init=False, repr=False)  # observe() calls so far

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight}")
        if self.max_age < 1:
            raise ValueError(f"max_age must be >= 1, got {self.max_age}")

    def reset(self) -> None:
        """Forget everything: a new run's policy owes nothing to the last one's."""
        self._ema.clear()
        self._measured_at.clear()
        self._steps = 0

    def observe(self, by_lag: Mapping[int, float]) -> None:
        """One learner step's {lag: KL per token}. Non-finite values are skipped (one NaN
        would poison an average for good); tiny negatives from rounding count as 0."""
        self._steps += 1
        for lag, value in by_lag.items():
            if lag < 0 or not math.isfinite(value):
                continue
            value = max(value, 0.0)
            old = self._ema.get(lag)
            self._ema[lag] = value if old is None else old + self.weight * (value - old)
            self._measured_at[lag] = self._steps
        self._forget_old()

    def _forget_old(self) -> None:
        for lag in [lag for lag, at in self._measured_at.items() if self._steps - at >= self.max_age]:
            del self._ema[lag], self._measured_at[lag]

    @property
    def measured(self) -> dict[int, float]:
        """The smoothed measurements, by lag (a copy)."""
        return dict(sorted(self._ema.items()))

    def estimate(self, lag: int) -> float | None:
        """The KL per token expected of data `lag` versions old; None if nothing says."""
        if lag in self._ema:
            return self._ema[lag]
        below = [j for j in self._ema if j < lag]
        base = max(below, default=0)
        if base < 1:
            return None
        return self._ema[base] * lag / base

    def envelope(self, lag: int) -> float | None:
        """The largest estimate over lags 0..lag (None if none is known): what the cap compares."""
        known = [e for e in (self.estimate(j) for j in range(lag + 1)) if e is not None]
        return max(known, default=None)

    def cap(self, budget: float, max_staleness: int, last: int | None = None) -> int:
        """The largest lag L <= max_staleness whose envelope stays within `budget`. With nothing
        measured the version cap alone holds; with lag 0 itself over budget the cap is 0 (only
        fresh data), as there is nothing fresher to fall back on.

        `last`, the cap in force, makes the cap loosen one version a step and tighten at once.
        Without it, one noisy batch over budget at lag 0 closes the cap to 0, and once the older
        lags age out nothing above lag 0 is known, so it reopened straight to the version cap:
        the long-answer run swung 0 -> 8 -> 0, and every swing down dropped what the swing up
        admitted. One version at a time, each newly admitted lag is measured before the next."""
        best, high = 0, 0.0
        for lag in range(max_staleness + 1):
            est = self.estimate(lag)
            high = max(high, est) if est is not None else high
            if high > budget:
                break
            best = lag
        return best if last is None else min(best, last + 1)
