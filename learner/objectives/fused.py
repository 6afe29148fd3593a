"""The VESPO hot path fused by torch.compile: one read of the inputs forward, one write back.

Eager PyTorch needs about ten passes over the (batch, tokens) tensors per step (log-ratio,
clamp, mask, three row sums, the coefficient, the dot product); on large batches that memory
traffic dominates. Everything VESPO needs per row, s = sum m clamp(log pi - log mu), the
length, sum m A and sum m A log pi, comes out of one fused reduction, and since the loss is
sum_b c_b * (sum_t m A log pi)_b with a per-row constant c_b, the gradient m A c_b is one
fused elementwise kernel in the backward. torch.compile writes those kernels for the device
at hand (C++/OpenMP on CPU, Triton on GPU); if it cannot, the eager path runs instead.
"""

from __future__ import annotations

import functools
import logging

import torch

from learner.objectives.inputs import LOG_RATIO_CLAMP, PolicyBatch, check_shapes

log = logging.getLogger(__name__)


def token_sums(lp: torch.Tensor, blp: torch.Tensor, adv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(4, B): s, length, sum m A, sum m A log pi per row."""
    r = (lp - blp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * m
    am = adv * m
    return torch.stack([r.sum(-1), m.sum(-1), am.sum(-1), (am * lp).sum(-1)])


def scaled_advantages(adv: torch.Tensor, m: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    return adv * m * row_scale.unsqueeze(-1)


def prepare_fused(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyBatch:
    """inputs.prepare with all row sums from one compiled pass (plus sum m A log pi)."""
    check_shapes(logprobs, behavior_logprobs, advantages, mask)
    lp, adv, m = logprobs.float(), advantages.float(), mask.float()
    with torch.no_grad():
        s, lengths, adv_sum, rowdot = compiled(token_sums)(lp.detach(), behavior_logprobs.float(), adv.detach(), m)
        seq_adv = adv_sum / lengths.clamp(min=1.0)
    return PolicyBatch(lp, behavior_logprobs, adv, m, lengths, s, seq_adv, adv_logprob_rowdot=rowdot)


@functools.cache
def compiled(fn):
    """fn compiled for dynamic shapes, or fn itself where torch.compile is unavailable."""
    try:
        return torch.compile(fn, dynamic=True)
    except Exception as err:  # a missing compiler must slow training down, not stop it
        log.warning("torch.compile unavailable (%s); VESPO runs its eager path", err)
        return fn


class RowScaledLogLik(torch.autograd.Function):
    """loss = sum_b c_b * rowdot_b where rowdot_b = sum_t m A log pi (computed by token_sums).

    The gradient with respect to log pi is m A c_b, produced by one fused kernel.
    """

    @staticmethod
    def forward(ctx, logprobs, rowdot, advantages, mask, row_coef):  # noqa: ARG004 - logprobs links the graph
        ctx.save_for_backward(advantages, mask, row_coef)
        return torch.dot(rowdot, row_coef)

    @staticmethod
    def backward(ctx, grad_output):
        advantages, mask, row_coef = ctx.saved_tensors
        grad = compiled(scaled_advantages)(advantages, mask, row_coef * grad_output)
        return grad, None, None, None, None
