"""Shared preparation of objective inputs: dtype, shape checks and per-sequence quantities.

Every objective needs the same things from a batch: the sequence log-weight s (a sum of
per-token log-ratios clamped to [-20, 20]), lengths and the sequence advantage. Computing them once here keeps
the objectives identical in how they treat masks, padding and extreme values, and keeps the
number of full (batch, tokens) passes low: this runs on every micro-batch of every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyBatch:
    """Float32 views of one batch plus the per-sequence quantities all objectives share.

    One batch serves one objective call: an objective may reuse `masked_advantages` as
    scratch space for its coefficients instead of allocating another (batch, tokens) tensor.
    """

    logprobs: torch.Tensor  # (B, T) float32, carries the gradient
    behavior_logprobs: torch.Tensor  # (B, T) as given
    advantages: torch.Tensor  # (B, T) float32
    masked_advantages: torch.Tensor  # (B, T) advantages * mask, detached
    mask: torch.Tensor  # (B, T) float32 in {0, 1}
    lengths: torch.Tensor  # (B,) number of valid tokens
    seq_log_weight: torch.Tensor  # (B,) s = sum_t m_t r_t, before any sequence-level clamp
    seq_advantage: torch.Tensor  # (B,) masked mean of the advantages (0 for empty rows)

    @property
    def valid_rows(self) -> torch.Tensor:
        return self.lengths > 0


def prepare(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyBatch:
    _check_shapes(logprobs, behavior_logprobs, advantages, mask)
    lp = logprobs.float()
    m = mask.float()
    adv = advantages.float()
    with torch.no_grad():
        # One fresh (B, T) buffer, used twice: on large CPU batches touching new memory costs
        # more than the arithmetic. Clamping turns +-inf at padded positions into +-20, which
        # the mask then zeroes.
        scratch = torch.sub(lp.detach(), behavior_logprobs.float())
        seq_log_weight = scratch.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).mul_(m).sum(-1)
        masked_adv = torch.mul(adv.detach(), m, out=scratch)
        lengths = m.sum(-1)
        seq_adv = masked_adv.sum(-1) / lengths.clamp(min=1.0)
    return PolicyBatch(lp, behavior_logprobs, adv, masked_adv, m, lengths, seq_log_weight, seq_adv)


def _check_shapes(*tensors: torch.Tensor) -> None:
    names = ("logprobs", "behavior_logprobs", "advantages", "mask")
    first = tensors[0]
    if first.dim() != 2:
        raise ValueError(f"logprobs must be (batch, tokens), got shape {tuple(first.shape)}")
    for name, t in zip(names, tensors, strict=True):
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(first.shape)} like logprobs")
