"""GRPO / PPO-clip at token level, with optional dual-clip for negative advantages."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from configtypes import NonNegative, section
from learner.objectives.aggregation import AggMode, aggregate
from learner.objectives.clipping import clipped_surrogate
from learner.objectives.inputs import LOG_RATIO_CLAMP, PolicyBatch
from learner.objectives.metrics import batch_policy_metrics, token_fraction, token_stats

# PPO's lower clip: the ratio is clipped at 1 - eps_low, which must stay above 0
EpsLow = Annotated[float, Field(ge=0, lt=1)]


@section("learner.objective_config", frozen=True)
class GrpoConfig:
    eps_low: EpsLow = 0.2
    eps_high: NonNegative = 0.2
    # Dual-clip bound c for A < 0 (loss never exceeds -A * c); None turns it off.
    dual_clip: Annotated[float, Field(gt=1)] | None = 3.0
    agg: AggMode = "token-mean"


def token_ratio(batch: PolicyBatch) -> torch.Tensor:
    """exp(clamp(log pi - log mu)) per token, with the gradient through log pi."""
    log_ratio = (batch.logprobs - batch.behavior_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio)


def grpo_objective(
    batch: PolicyBatch,
    config: GrpoConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    ratio = token_ratio(batch)
    adv = batch.advantages
    token_loss, clipped = clipped_surrogate(ratio, adv, config.eps_low, config.eps_high)
    dual_clipped = torch.zeros_like(clipped)
    if config.dual_clip is not None:
        bound = -adv * config.dual_clip
        dual_clipped = (adv < 0) & (token_loss > bound)
        token_loss = torch.where(dual_clipped, bound, token_loss)
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights.float().detach()
    loss = aggregate(token_loss, batch.mask, config.agg)

    metrics = batch_policy_metrics(loss, batch.lengths, batch.seq_log_weight)
    metrics.update(token_stats("actor/ratio", ratio, batch.mask))
    metrics["actor/pg_clipfrac"] = token_fraction(clipped, batch.mask)
    metrics["actor/pg_clipfrac_lower"] = token_fraction(dual_clipped, batch.mask)
    return loss, metrics
