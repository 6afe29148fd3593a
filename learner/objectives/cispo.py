"""CISPO: the clipped token ratio as a detached weight on log pi.

Unlike PPO-clip, clipping never zeroes a token's gradient; it only bounds how much a token
can be up-weighted, so rare but important tokens keep contributing.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from configtypes import NonNegative, section
from learner.objectives.aggregation import AggMode, row_weights_like
from learner.objectives.grpo import token_ratio
from learner.objectives.inputs import PolicyBatch
from learner.objectives.metrics import batch_policy_metrics, token_fraction, token_stats
from learner.objectives.weighted_loglik import weighted_loglik


@section("learner.objective_config", frozen=True)
class CispoConfig:
    eps_low: Annotated[float, Field(ge=0, le=1)] = 0.2  # the weight's floor 1 - eps_low may reach 0, never below
    eps_high: NonNegative = 0.2
    agg: AggMode = "token-mean"


def cispo_objective(
    batch: PolicyBatch, config: CispoConfig, rollout_is_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    with torch.no_grad():
        ratio = token_ratio(batch)
    weight = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    clipped = weight != ratio
    if rollout_is_weights is not None:
        weight.mul_(rollout_is_weights.float())
    row_w = row_weights_like(batch.lengths, config.agg)
    coef = weight.mul_(batch.masked_advantages(-row_w))
    loss = weighted_loglik(batch.logprobs, coef)

    metrics = batch_policy_metrics(loss, batch.lengths, batch.seq_log_weight)
    metrics.update(token_stats("actor/ratio", ratio, batch.mask))
    metrics["actor/pg_clipfrac"] = token_fraction(clipped, batch.mask)
    return loss, metrics
