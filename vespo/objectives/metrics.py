"""Metric helpers shared by the objectives: statistics as plain Python floats.

Metrics go straight to wandb and across Ray, so they are floats, not tensors. Per-sequence
statistics are taken in numpy on a few hundred values: one host copy per vector instead of
dozens of tiny torch ops, which would otherwise cost as much as the loss itself.
"""

from __future__ import annotations

import numpy as np
import torch

from vespo.objectives.inputs import PolicyBatch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def row_stats(
    prefix: str, values: np.ndarray, where: np.ndarray, *, std: bool = False, only: str | None = None
) -> dict[str, float]:
    """mean/max/min (and std) of values[where], or just one of them; zeros when none selected."""
    picked = values[where]
    names = [only] if only else ["mean", "max", "min"] + (["std"] if std else [])
    if picked.size == 0:
        return {f"{prefix}_{n}": 0.0 for n in names}
    fns = {"mean": np.mean, "max": np.max, "min": np.min, "std": np.std}
    return {f"{prefix}_{n}": float(fns[n](picked)) for n in names}


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


def policy_metrics(loss: torch.Tensor, batch: PolicyBatch) -> dict[str, float]:
    """Metrics every objective reports, defined the same way for all of them.

    actor/ppo_kl is the approximate KL(mu || pi) per token, -mean over sequences of s / length.
    """
    lengths = to_numpy(batch.lengths)
    valid = lengths > 0
    per_token_log_w = to_numpy(batch.seq_log_weight)[valid] / lengths[valid]
    return {
        "actor/pg_loss": float(loss.detach()),
        "actor/ppo_kl": float(-per_token_log_w.mean()) if valid.any() else 0.0,
        "actor/n_tokens": float(lengths.sum()),
        "actor/n_seqs": float(valid.sum()),
    }
