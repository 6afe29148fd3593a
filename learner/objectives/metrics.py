"""Metric helpers shared by the objectives: statistics as plain Python floats.

Metrics go straight to wandb and across Ray, so they are floats, not tensors. Per-sequence
statistics are taken in numpy on batch-sized vectors with a handful of vectorised calls:
dozens of tiny tensor (or numpy) ops per micro-batch would cost as much as the loss itself.
"""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def row_stats(prefix: str, values: dict[str, np.ndarray], where: np.ndarray) -> dict[str, float]:
    """{prefix}/{name}_{mean,max,min} of each vector over rows where `where`; 0 if none."""
    n = int(where.sum())
    if n == 0:
        return {f"{prefix}/{name}_{stat}": 0.0 for name in values for stat in ("mean", "max", "min")}
    vals = np.stack(list(values.values()))
    means = vals @ where.astype(np.float64) / n
    highs = np.where(where, vals, -np.inf).max(1)
    lows = np.where(where, vals, np.inf).min(1)
    out = {}
    for i, name in enumerate(values):
        out[f"{prefix}/{name}_mean"] = float(means[i])
        out[f"{prefix}/{name}_max"] = float(highs[i])
        out[f"{prefix}/{name}_min"] = float(lows[i])
    return out


def split_means(prefix: str, values: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> dict[str, float]:
    """{prefix}/{value}_{group}_mean for every value and row group, in one matrix product."""
    masks = np.stack(list(groups.values())).astype(np.float64)
    means = np.stack(list(values.values())) @ masks.T / np.maximum(masks.sum(1), 1.0)
    return {f"{prefix}/{v}_{g}_mean": float(means[i, j]) for i, v in enumerate(values) for j, g in enumerate(groups)}


def token_stats(prefix: str, values: torch.Tensor, mask: torch.Tensor, *, only_mean: bool = False) -> dict[str, float]:
    """mean/max/min of a (batch, tokens) tensor over mask == 1, without boolean indexing
    (which copies the selection and costs more than the objective itself on big batches)."""
    values = values.detach().float()
    n = mask.sum()
    if n == 0:
        return {f"{prefix}_mean": 0.0} if only_mean else {f"{prefix}_{k}": 0.0 for k in ("mean", "max", "min")}
    mean = (values * mask).sum() / n
    if only_mean:
        return {f"{prefix}_mean": float(mean)}
    valid = mask > 0
    hi = torch.where(valid, values, -torch.inf).max()
    lo = torch.where(valid, values, torch.inf).min()
    stats = torch.stack([mean, hi, lo]).tolist()
    return {f"{prefix}_{k}": v for k, v in zip(("mean", "max", "min"), stats, strict=True)}


def token_fraction(flags: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of valid tokens where flags is set."""
    n = mask.sum()
    return float((flags * mask).sum() / n) if n > 0 else 0.0


def policy_metrics(loss: torch.Tensor, lengths: np.ndarray, seq_log_weight: np.ndarray) -> dict[str, float]:
    """Metrics every objective reports, defined the same way for all of them.

    actor/ppo_kl is the approximate KL(mu || pi) per token, -mean over sequences of s / length.
    """
    n_seqs = float(np.count_nonzero(lengths))
    per_token = seq_log_weight / np.maximum(lengths, 1.0)  # empty rows have s = 0
    # The true sequence weight W = pi/mu = exp(s), whatever the objective does with it: how
    # far off-policy the batch is (bench/staleness_sweep.py tabulates its max and mean).
    w = np.exp(np.clip(seq_log_weight, -20.0, 20.0))[lengths > 0]
    return {
        "actor/seq_w_max": float(w.max()) if len(w) else 0.0,
        "actor/seq_w_mean": float(w.mean()) if len(w) else 0.0,
        "actor/pg_loss": float(loss.detach()),
        "actor/ppo_kl": -float(per_token.sum()) / n_seqs if n_seqs else 0.0,
        "actor/n_tokens": float(lengths.sum()),
        "actor/n_seqs": n_seqs,
    }


def batch_policy_metrics(loss: torch.Tensor, lengths: torch.Tensor, seq_log_weight: torch.Tensor) -> dict[str, float]:
    """policy_metrics from tensors, for objectives that do not already hold the numpy rows."""
    rows = to_numpy(torch.stack([lengths, seq_log_weight])).astype(np.float64)
    return policy_metrics(loss, rows[0], rows[1])
