"""sum(coef * log pi) with coef fixed: the loss of every objective that is linear in log pi.

VESPO and CISPO both weight grad log pi by a detached coefficient. Written with plain
autograd, (coef * logprobs).sum() allocates a (batch, tokens) product in the forward and
another in the backward; on large CPU batches touching fresh memory costs more than the
arithmetic. Here the forward is one BLAS dot product over the flattened tensors and the
backward scales coef in place and hands it over as the gradient: no temporary at all.

The price: one backward pass per forward. A second pass through the same graph
(retain_graph=True) raises instead of silently returning a wrong gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _WeightedLogLik(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        # A plain attribute, not save_for_backward: the backward then owns the only reference
        # and autograd can adopt the tensor as the gradient instead of copying it.
        ctx.coef = coef
        return torch.dot(logprobs.reshape(-1), coef.reshape(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        coef = getattr(ctx, "coef", None)
        if coef is None:
            raise RuntimeError(
                "the policy loss supports one backward pass per forward; recompute the loss "
                "instead of calling backward twice with retain_graph=True"
            )
        del ctx.coef
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return coef, None  # plain loss.backward(): skip a full pass over coef
        return coef.mul_(grad_output), None


def weighted_loglik(logprobs: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Scalar sum(coef * logprobs); its gradient with respect to logprobs is exactly coef.

    `coef` is consumed: it becomes the gradient buffer, so the caller must not reuse it.
    """
    return _WeightedLogLik.apply(logprobs, coef.detach())
