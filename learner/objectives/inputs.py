"""Shared preparation of objective inputs: dtype, shape checks and per-sequence quantities.

Every objective needs the same things from a batch: the sequence log-weight s (a sum of
per-token log-ratios clamped to [-20, 20]), lengths and the sequence advantage. Computing
them once here keeps the objectives identical in how they treat masks, padding and extreme
values. This runs on every micro-batch, so the (batch, tokens) passes are kept few and
in place: on large batches memory traffic and fresh allocations, not arithmetic, are the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyBatch:
    """Float32 views of one batch plus the per-sequence quantities all objectives share."""

    logprobs: torch.Tensor  # (B, T) float32, carries the gradient
    behavior_logprobs: torch.Tensor  # (B, T) as given
    advantages: torch.Tensor  # (B, T) float32
    mask: torch.Tensor  # (B, T) float32 in {0, 1}
    lengths: torch.Tensor  # (B,) number of valid tokens
    seq_log_weight: torch.Tensor  # (B,) s = sum_t m_t r_t, before any sequence-level clamp
    seq_advantage: torch.Tensor  # (B,) masked mean of the advantages (0 for empty rows)
    scratch: torch.Tensor | None = None  # a free (B, T) float32 buffer left over by prepare
    adv_logprob_rowdot: torch.Tensor | None = None  # (B,) sum m A log pi, from the fused path

    def masked_advantages(self, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh detached (B, T) tensor advantages * mask (* row_scale per row)."""
        adv, m = self.advantages.detach(), self.mask
        out = torch.mul(adv, m, out=self.scratch) if self.scratch is not None else adv * m
        self.scratch = None  # handed out: never give the same buffer twice
        return out if row_scale is None else out.mul_(row_scale.unsqueeze(-1))


def prepare(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyBatch:
    check_shapes(logprobs, behavior_logprobs, advantages, mask)
    lp = logprobs.float()
    m = mask.float()
    adv = advantages.float()
    with torch.no_grad():
        # In place on one fresh buffer, which is then lent to the objective. Clamping turns
        # +-inf at padded positions into +-20, which the mask then zeroes.
        scratch = torch.sub(lp.detach(), behavior_logprobs.float())
        seq_log_weight = scratch.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).mul_(m).sum(-1)
        lengths = m.sum(-1)
        seq_adv = torch.mul(adv.detach(), m, out=scratch).sum(-1) / lengths.clamp(min=1.0)
    return PolicyBatch(lp, behavior_logprobs, adv, m, lengths, seq_log_weight, seq_adv, scratch)


def check_shapes(*tensors: torch.Tensor) -> None:
    names = ("logprobs", "behavior_logprobs", "advantages", "mask")
    first = tensors[0]
    if first.dim() != 2:
        raise ValueError(f"logprobs must be (batch, tokens), got shape {tuple(first.shape)}")
    for name, t in zip(names, tensors, strict=True):
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(first.shape)} like logprobs")
