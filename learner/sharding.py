"""A batch split over data-parallel ranks, and the ranks' step results merged back into one.

Rows are dealt round-robin in length order, so ranks get similar token counts and finish a
step together. Every rank is told the batch's global counts (batch_totals), so the loss
weights of all micro-batches on all ranks add up to the whole batch's aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from learner.batching import TrainBatch
from learner.step_result import StepResult


def batch_totals(batch: TrainBatch) -> dict[str, float]:
    mask = batch.response_mask
    return {"tokens": float(mask.sum()), "sequences": float((mask.sum(-1) > 0).sum())}


def shard_rows(batch: TrainBatch, world_size: int) -> list[torch.Tensor]:
    """Row indices per rank: round-robin over length-sorted rows, so ranks get similar token counts."""
    order = np.argsort(batch.attention_mask.sum(-1).numpy(), kind="stable")[::-1]
    return [torch.from_numpy(order[r::world_size].copy()) for r in range(world_size)]


def shard(batch: TrainBatch, world_size: int) -> list[TrainBatch]:
    return [batch.rows(rows) for rows in shard_rows(batch, world_size)]


_MERGE: dict[str, Callable] = {
    "actor/loss": sum,
    "staleness/oldest_version": min,
    "staleness/newest_version": max,
    "staleness/token_max": max,
    "staleness/token_min": min,
}


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Ranks' metrics: the loss adds up (each rank holds its share), version bounds and
    *_max / *_min statistics take the extreme, everything else is averaged. A key only some
    ranks report is merged over those ranks alone."""
    keys = set().union(*per_rank)
    return {k: float(_merge_rule(k)([m[k] for m in per_rank if k in m])) for k in sorted(keys)}


def merge_results(per_rank: list[StepResult]) -> StepResult:
    """Ranks' step results as one: metrics as merge_metrics does, the KL of each lag weighted by
    the tokens each rank measured it on (a rank whose shard has no token of lag L says nothing
    about L)."""
    sums: dict[int, float] = {}
    tokens: dict[int, float] = {}
    for result in per_rank:
        for lag, kl in result.kl_by_lag.items():
            n = result.tokens_by_lag.get(lag, 1.0)
            sums[lag] = sums.get(lag, 0.0) + kl * n
            tokens[lag] = tokens.get(lag, 0.0) + n
    kl_by_lag = {lag: sums[lag] / tokens[lag] for lag in sorted(sums) if tokens[lag] > 0}
    return StepResult(merge_metrics([r.metrics for r in per_rank]), kl_by_lag, {lag: tokens[lag] for lag in kl_by_lag})


def _merge_rule(key: str) -> Callable:
    if key in _MERGE:
        return _MERGE[key]
    if key.endswith("_max"):
        return max
    if key.endswith("_min"):
        return min
    return np.mean
