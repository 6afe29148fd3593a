"""How far off-policy the learner finds its data, by lag (`StepResult.kl_by_lag`).

For each response token sampled by the behaviour policy mu, the k3 estimator of KL(mu || pi)
    r = pi / mu = exp(logprob - behavior_logprob),    kl = (r - 1) - log r   (>= 0)
is unbiased under mu and never negative, unlike -log r. Tokens are binned by their lag,
learner version minus the version that sampled them: a mean per lag says how much drift a
given staleness costs, which is what buffer.divergence turns into a staleness cap.

The behaviour log-probs are the sampler's own (not a recomputed pi_old): the divergence that
matters is between what generated the token and what is trained now. Sums and counts stay on
the device over the micro-batches (two bincounts each), and come to the host once per step.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0  # |log r| beyond this is one broken token, not a measurement: keep exp finite


def k3_kl(logprobs: torch.Tensor, behavior_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(mu || pi) for tokens sampled from mu: (r - 1) - log r."""
    log_ratio = (logprobs.detach().float() - behavior_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(log_ratio) - log_ratio  # expm1: no cancellation in r - 1 for r near 1


class LagKL:
    """Sums of k3 KL and token counts per integer lag, accumulated over a step's micro-batches."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
            lags: torch.Tensor) -> None:  # fmt: skip
        """One micro-batch: (rows, tokens) tensors; `mask` 1 on response tokens, `lags` the
        learner version minus each token's sampling version (anything off the mask)."""
        weight = mask.detach().float().flatten()
        bins = torch.where(weight > 0, lags.to(weight.device).flatten(), 0).clamp(min=0).long()
        kl = k3_kl(logprobs, behavior_logprobs.to(logprobs.device)).flatten() * weight
        sums = torch.bincount(bins, weights=kl)
        counts = torch.bincount(bins, weights=weight)
        self.sums = _add_padded(self.sums, sums)
        self.counts = _add_padded(self.counts, counts)

    def by_lag(self) -> tuple[dict[int, float], dict[int, float]]:
        """({lag: mean KL per token}, {lag: response tokens}) for every lag with response tokens."""
        if self.sums is None or self.counts is None:
            return {}, {}
        sums, counts = self.sums.double().cpu().tolist(), self.counts.double().cpu().tolist()
        measured = [(lag, s, n) for lag, (s, n) in enumerate(zip(sums, counts, strict=True)) if n > 0]
        return {lag: s / n for lag, s, n in measured}, {lag: n for lag, _, n in measured}


def _add_padded(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """total + part, the shorter padded with zeros (bincount's length is the largest lag + 1)."""
    if total is None:
        return part
    size = max(total.numel(), part.numel())
    out = torch.zeros(size, dtype=total.dtype, device=total.device)
    out[: total.numel()] += total
    out[: part.numel()] += part.to(total.device)
    return out


def staleness_metrics(token_versions: torch.Tensor, step: int) -> dict[str, float]:
    """The versions of a batch's sampled tokens (-1 off the response) and their lag behind `step`."""
    versions = token_versions[token_versions >= 0]
    if not versions.numel():
        return {}
    lag = (step - versions).float()  # learner version minus sampling version, per token
    return {
        "staleness/oldest_version": float(versions.min()), "staleness/newest_version": float(versions.max()),
        "staleness/token_max": float(lag.max()), "staleness/token_mean": float(lag.mean()),
        "staleness/token_min": float(lag.min()),
    }  # fmt: skip
