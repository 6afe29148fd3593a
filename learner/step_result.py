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


def merge_results(per_rank: list[StepResult], merge_metrics) -> StepResult:
    """Ranks' results as one: metrics by `merge_metrics`, the KL of each lag weighted by the tokens
    each rank measured it on (a rank whose shard has no token of lag L says nothing about L)."""
    sums: dict[int, float] = {}
    tokens: dict[int, float] = {}
    for result in per_rank:
        for lag, kl in result.kl_by_lag.items():
            n = result.tokens_by_lag.get(lag, 1.0)
            sums[lag] = sums.get(lag, 0.0) + kl * n
            tokens[lag] = tokens.get(lag, 0.0) + n
    kl_by_lag = {lag: sums[lag] / tokens[lag] for lag in sorted(sums) if tokens[lag] > 0}
    return StepResult(merge_metrics([r.metrics for r in per_rank]), kl_by_lag, {lag: tokens[lag] for lag in kl_by_lag})
