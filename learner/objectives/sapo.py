"""SAPO: a soft sigmoid gate on the token ratio instead of a hard clip.

gate(r) = sigmoid(tau (r - 1)) * 4 / tau has slope 1 at r = 1, so on-policy it is the plain
policy gradient; away from r = 1 the gradient fades smoothly rather than being cut off.
"""

from __future__ import annotations

import torch

from configtypes import Positive, section
from learner.objectives.aggregation import AggMode, aggregate
from learner.objectives.grpo import token_ratio
from learner.objectives.inputs import PolicyBatch
from learner.objectives.metrics import batch_policy_metrics, token_stats


@section("learner.objective_config", frozen=True)
class SapoConfig:
    tau_pos: Positive = 1.0  # gate temperatures for A > 0 and A <= 0
    tau_neg: Positive = 1.05
    agg: AggMode = "seq-mean-token-mean"


def sapo_objective(
    batch: PolicyBatch,
    config: SapoConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    ratio = token_ratio(batch)
    adv = batch.advantages
    tau = torch.where(adv > 0, config.tau_pos, config.tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    token_loss = -gate * adv
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights.float().detach()
    loss = aggregate(token_loss, batch.mask, config.agg)

    metrics = batch_policy_metrics(loss, batch.lengths, batch.seq_log_weight)
    metrics.update(token_stats("actor/ratio", ratio, batch.mask))
    metrics.update(token_stats("sapo/gate", gate, batch.mask, only_mean=True))
    return loss, metrics
