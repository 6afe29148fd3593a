"""GRPO / PPO-clip at token level, with optional dual-clip for negative advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.objectives.aggregation import aggregate, check_agg_mode
from learner.objectives.clipping import clipped_surrogate
from learner.objectives.inputs import LOG_RATIO_CLAMP, PolicyBatch
from learner.objectives.metrics import batch_policy_metrics, token_fraction, token_stats


@dataclass(frozen=True)
class GrpoConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    # Dual-clip bound c for A < 0 (loss never exceeds -A * c); None turns it off.
    dual_clip: float | None = 3.0
    agg: str = "token-mean"

    def __post_init__(self) -> None:
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"GRPO needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"GRPO dual_clip must be > 1 (or None), got {self.dual_clip}")
        check_agg_mode(self.agg)


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
