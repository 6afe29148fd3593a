"""What one learner step reports: metrics for people, and the KL by lag the controller acts on.

The dashboard's metrics are a flat dict of names. The KL by lag is different: the controller
feeds it to `buffer.divergence`, which turns it into a staleness cap, so it travels as numbers
keyed by lag, never as metric names parsed back; its dashboard names are made only for display.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def kl_metric(lag: int) -> str:
    """The dashboard name of the mean KL per token of data `lag` versions old."""
    return f"divergence/kl_lag{lag}"


@dataclass
class StepResult:
    metrics: dict[str, float]
    kl_by_lag: dict[int, float] = field(default_factory=dict)  # lag -> mean k3 KL(mu || pi) per response token
    tokens_by_lag: dict[int, float] = field(default_factory=dict)  # lag -> response tokens it was measured on

    def dashboard(self) -> dict[str, float]:
        """The metrics with the KL by lag under its display names."""
        return {**self.metrics, **{kl_metric(lag): kl for lag, kl in sorted(self.kl_by_lag.items())}}
