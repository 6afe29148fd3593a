"""VESPO: sequence-level importance weights reshaped by a gamma-shaped kernel.

The gradient coefficient on grad log pi is phi(W) = W^k exp(lambda (1 - W)) with
W = exp(s) the *unnormalised* sequence importance weight. phi(1) = 1, it peaks at
W = k / lambda and decays softly to 0 for both tiny and huge weights, which is what keeps
heavily stale rollouts from blowing up the update. phi only scales the gradient, so it is
computed from detached log-ratios and the loss is -phi * A * log pi.

Everything per sequence (s, phi, the metrics) is a vector of batch size; it is computed in
float64 numpy on the host in one go, which is both more precise and far cheaper than dozens
of tiny tensor ops. The per-token work stays in torch.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from configtypes import NonNegative, Positive, section
from learner.objectives.aggregation import AggMode, row_weights
from learner.objectives.autotune import ess, shape_scale
from learner.objectives.fused import RowScaledLogLik
from learner.objectives.inputs import LOG_RATIO_CLAMP, PolicyBatch
from learner.objectives.metrics import policy_metrics, row_stats, split_means, to_numpy
from learner.objectives.weighted_loglik import weighted_loglik

LAMBDA_FLOOR = 1e-4


@section("learner.objective_config", frozen=True)
class VespoConfig:
    """Kernel shapes by the sign of the sequence advantage (released defaults)."""

    k_pos: NonNegative = 2.0  # shape for A >= 0
    lambda_pos: NonNegative = 3.0
    k_neg: NonNegative = 3.0  # shape for A < 0
    lambda_neg: NonNegative = 2.0
    agg: AggMode = "token-mean"
    # Fuse the per-token passes with torch.compile (learner.objectives.fused): about half the
    # memory traffic of the eager path. The first call in a process compiles (seconds).
    fused: bool = True
    # Negative-advantage sequences with W above this are the ones that can push a good
    # policy down hard; their count and max W are logged as an early warning.
    neg_w_noise_threshold: Positive = 2.0
    # If set, (k, lambda) of both shapes are scaled by one factor per batch, the largest that
    # keeps the normalised ESS of phi at or above this target (learner.objectives.autotune).
    target_ess: Annotated[float, Field(gt=0, le=1)] | None = None
    # Ablation only: phi of the per-token geometric mean exp(s / length) instead of the true
    # sequence weight exp(s), as GSPO does. The paper reports that this variant fails under
    # staleness; bench/staleness_sweep.py compares it (docs/results.md).
    length_norm: bool = False


def log_phi(s: np.ndarray, k: np.ndarray | float, lam: np.ndarray | float) -> np.ndarray:
    """log phi(W) = lambda + k s - lambda exp(s), s clamped to [-20, 20], lambda floored at 1e-4."""
    s = np.clip(np.asarray(s, dtype=np.float64), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lam = np.maximum(lam, LAMBDA_FLOOR)
    return lam + k * s - lam * np.exp(s)


def phi(s: np.ndarray | float, k: np.ndarray | float, lam: np.ndarray | float) -> np.ndarray:
    """phi(W) for W = exp(s), normalised so phi(1) = 1.

    In log space: log phi = lambda + k s - lambda exp(s), with s clamped to [-20, 20] and
    lambda floored at 1e-4; NaN or inf (from NaN inputs) becomes 0.
    """
    # exp(709) is the float64 limit: capping the log keeps huge user k finite; NaN stays NaN.
    out = np.exp(np.minimum(log_phi(s, k, lam), 700.0))
    return np.where(np.isfinite(out), out, 0.0)


def vespo_objective(
    batch: PolicyBatch, config: VespoConfig, rollout_is_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    per_row = [batch.seq_log_weight, batch.seq_advantage, batch.lengths]
    if rollout_is_weights is not None:
        per_row.append(mismatch_log_weight(rollout_is_weights, batch.mask))
    rows = to_numpy(torch.stack(per_row)).astype(np.float64)
    s_pi_mu, seq_adv, lengths = rows[:3]
    mismatch = rows[3] if rollout_is_weights is not None else None
    # The mismatch term turns W = pi/pi_old into pi/pi_sampler; clamp after all terms are in.
    s = s_pi_mu if mismatch is None else s_pi_mu + mismatch
    if config.length_norm:
        s = s / np.maximum(lengths, 1.0)
    s = np.clip(s, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    pos = seq_adv >= 0
    valid = lengths > 0
    k = np.where(pos, config.k_pos, config.k_neg)
    lam = np.where(pos, config.lambda_pos, config.lambda_neg)
    scale = 1.0
    if config.target_ess is not None:
        base = log_phi(s[valid], k[valid], lam[valid])
        scale = shape_scale(np.where(np.isfinite(base), base, -np.inf), config.target_ess)
    weight = phi(s, k * scale, np.maximum(lam, LAMBDA_FLOOR) * scale)

    # loss = sum_bt coef_bt log pi_bt with coef = -phi_b * w_b * A_bt * m_bt, where w_b is the
    # aggregation's row weight: linear in log pi, so its gradient is exactly coef.
    row_coef = torch.from_numpy(-weight * row_weights(lengths, config.agg)).to(batch.advantages)
    if batch.adv_logprob_rowdot is not None:
        loss = RowScaledLogLik.apply(
            batch.logprobs, batch.adv_logprob_rowdot, batch.advantages.detach(), batch.mask, row_coef
        )
    else:
        loss = weighted_loglik(batch.logprobs, batch.masked_advantages(row_coef))

    metrics = policy_metrics(loss, lengths, s_pi_mu)
    metrics.update(_vespo_metrics(config, valid, s, weight, pos, mismatch, scale))
    return loss, metrics


def mismatch_log_weight(rollout_is_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t m_t clamp(log rho_t) for rho_t = pi_old / pi_sampler."""
    log_rho = torch.log(rollout_is_weights.detach().float()).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_rho.mul_(mask).sum(-1)


def _vespo_metrics(
    config: VespoConfig,
    valid: np.ndarray,
    s: np.ndarray,
    weight: np.ndarray,
    pos: np.ndarray,
    mismatch: np.ndarray | None,
    scale: float,
) -> dict[str, float]:
    w = np.exp(s)
    is_pos, is_neg = valid & pos, valid & ~pos
    neg_high = is_neg & (w > config.neg_w_noise_threshold)
    rows = {"W": w, "s": s, "phi": weight}
    if mismatch is not None:
        rows["mismatch_s"] = mismatch
    out = row_stats("vespo", rows, valid)
    out.update(split_means("vespo", {"W": w, "phi": weight}, {"pos": is_pos, "neg": is_neg}))
    n_valid, n_pos, n_neg, n_high = (float(x) for x in np.stack([valid, is_pos, is_neg, neg_high]).sum(1))
    out["vespo/W_std"] = float(np.sqrt(max((w * w) @ valid / max(n_valid, 1.0) - out["vespo/W_mean"] ** 2, 0.0)))
    out["vespo/W_neg_high_max"] = float(np.where(neg_high, w, 0.0).max()) if n_high else 0.0
    out["vespo/n_pos"], out["vespo/n_neg"], out["vespo/n_neg_high_W"] = n_pos, n_neg, n_high
    out["vespo/k_pos"] = float(config.k_pos) * scale
    out["vespo/lambda_pos"] = max(config.lambda_pos, LAMBDA_FLOOR) * scale
    out["vespo/k_neg"] = float(config.k_neg) * scale
    out["vespo/lambda_neg"] = max(config.lambda_neg, LAMBDA_FLOOR) * scale
    out["vespo/shape_scale"] = scale
    out["vespo/ess"] = ess(weight[valid]) if n_valid else 0.0
    return out
