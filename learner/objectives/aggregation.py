"""Loss aggregation: how per-token losses become one scalar.

Every mode is a weighted sum of per-row masked sums, loss = sum_b w_b * sum_t m_bt * l_bt,
so an objective only has to produce its per-row sums (or fold w_b into a per-token
coefficient) and the mode only decides the row weights. Rows with no valid token get
weight 0: they contribute nothing, and an all-masked batch gives loss 0, never NaN.
Row weights are a batch-sized vector, computed in float64 numpy.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_agg_mode(mode: str) -> str:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    return mode


AggMode = Annotated[str, AfterValidator(check_agg_mode)]  # the `agg` option every objective takes


def row_weights(lengths: np.ndarray, mode: str) -> np.ndarray:
    """Weights w_b such that the aggregated loss is sum_b w_b * (masked row sum)_b."""
    check_agg_mode(mode)
    lengths = np.asarray(lengths, dtype=np.float64)
    valid = lengths > 0
    if not valid.any():
        return np.zeros_like(lengths)
    if mode == "token-mean":
        return valid / lengths.sum()
    per_row = valid / valid.sum()
    if mode == "seq-mean-token-mean":
        return per_row / np.maximum(lengths, 1.0)
    return per_row


def row_weights_like(lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """row_weights as a tensor on the device and in the dtype of `lengths`."""
    return torch.from_numpy(row_weights(lengths.detach().cpu().numpy(), mode)).to(lengths)


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Aggregate a (batch, tokens) loss under a (batch, tokens) mask."""
    mask = mask.to(token_loss.dtype)
    return ((token_loss * mask).sum(-1) * row_weights_like(mask.sum(-1), mode)).sum()
