"""Loss aggregation: how per-token losses become one scalar.

Every mode is a weighted sum of per-row masked sums, loss = sum_b w_b * sum_t m_bt * l_bt,
so an objective only has to produce its per-row sums (often without materialising the
per-token loss) and the mode only decides the row weights. Rows with no valid token get
weight 0: they contribute nothing, and an all-masked batch gives loss 0, never NaN.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_agg_mode(mode: str) -> str:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    return mode


def row_weights(lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights w_b such that the aggregated loss is sum_b w_b * (masked row sum)_b."""
    valid = lengths > 0
    if mode == "token-mean":
        total = lengths.sum()
        return torch.where(valid, 1.0 / total.clamp(min=1e-12), 0.0)
    n_valid = valid.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return torch.where(valid, 1.0 / (lengths.clamp(min=1e-12) * n_valid), 0.0)
    if mode == "seq-mean-token-sum":
        return torch.where(valid, 1.0 / n_valid, 0.0).to(lengths.dtype)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")


def aggregate_rows(row_sums: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    return (row_sums * row_weights(lengths, mode)).sum()


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Aggregate a (batch, tokens) loss under a (batch, tokens) mask."""
    mask = mask.to(token_loss.dtype)
    return aggregate_rows((token_loss * mask).sum(-1), mask.sum(-1), mode)
