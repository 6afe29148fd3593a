"""GSPO: PPO-style clipping of the length-normalised (geometric-mean) sequence ratio.

Each token carries the same value, exp(s / length), but its gradient flows through its own
log pi: the surrogate log ratio is log pi_t - sg(log pi_t) + sg(s / length).
"""

from __future__ import annotations

import numpy as np
import torch

from configtypes import NonNegative, section
from learner.objectives.aggregation import AggMode, aggregate
from learner.objectives.clipping import clipped_surrogate
from learner.objectives.grpo import EpsLow
from learner.objectives.inputs import PolicyBatch
from learner.objectives.metrics import batch_policy_metrics, row_stats, to_numpy, token_fraction

MAX_LOG_SEQ_RATIO = 10.0


@section("learner.objective_config", frozen=True)
class GspoConfig:
    eps_low: EpsLow = 3e-4
    eps_high: NonNegative = 4e-4
    agg: AggMode = "seq-mean-token-mean"


def gspo_objective(
    batch: PolicyBatch, config: GspoConfig, rollout_is_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    s_bar = batch.seq_log_weight / batch.lengths.clamp(min=1.0)
    lp = batch.logprobs
    log_ratio = (lp - lp.detach() + s_bar.unsqueeze(-1)).clamp(max=MAX_LOG_SEQ_RATIO)
    ratio = torch.exp(log_ratio)
    token_loss, clipped = clipped_surrogate(ratio, batch.advantages, config.eps_low, config.eps_high)
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights.float().detach()
    loss = aggregate(token_loss, batch.mask, config.agg)

    metrics = batch_policy_metrics(loss, batch.lengths, batch.seq_log_weight)
    metrics.update(row_stats("actor", {"ratio": np.exp(to_numpy(s_bar))}, to_numpy(batch.lengths) > 0))
    metrics["actor/pg_clipfrac"] = token_fraction(clipped, batch.mask)
    return loss, metrics
