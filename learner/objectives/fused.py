"""The VESPO hot path fused by torch.compile: one read of the inputs forward, one write back.

Eager PyTorch needs about ten passes over the (batch, tokens) tensors per step (log-ratio,
clamp, mask, three row sums, the coefficient, the dot product); on large batches that memory
traffic dominates. Everything VESPO needs per row, s = sum m clamp(log pi - log mu), the
length, sum m A and sum m A log pi, comes out of one fused reduction, and since the loss is
sum_b c_b * (sum_t m A log pi)_b with a per-row constant c_b, the gradient m A c_b is one
fused elementwise kernel in the backward. torch.compile writes those kernels for the device
at hand (C++/OpenMP on CPU, Triton on GPU); if it cannot, the same functions run eagerly.
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


# Inductor's C++ code generator makes a loop parallel only when the shapes it compiles for
# hold enough work, and its on-disk graph cache (shared by every process of the user on the
# machine, /tmp/torchinductor_<user>) keys a dynamic-shape graph by symbolic shapes alone. So
# a graph first compiled on a tiny batch, by a test run or by a first small micro-batch, ran
# single-threaded for every later batch of every later process, while eager ATen used all
# cores: the fused path was then no faster than the eager one. dynamic_threads always emits
# the parallel loop and lets OpenMP size the team at run time; being part of the cache key,
# it also keeps the serial entries compiled without it from being served. Only the loop over
# rows is split and each row is summed in the same order: the results are bit for bit those
# of a kernel compiled on a large batch.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


class CompiledOrEager:
    """fn compiled for dynamic shapes; fn itself once compiling has failed.

    torch.compile is lazy: a missing or broken C++ compiler only shows at the first call, as
    an exception from inside the training step. A missing compiler must slow training down,
    not stop it. When a compiled call fails, the eager function is tried on the same inputs:
    if it fails too, the inputs were at fault and its error propagates; if it succeeds, the
    compiler was, and the eager function runs from then on.
    """

    def __init__(self, fn):
        self.fn = fn
        self.impl = fn
        try:
            self.impl = torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS)
        except Exception as err:
            log.warning("torch.compile unavailable (%s); VESPO runs its eager path", err)

    @property
    def active(self) -> bool:
        """Whether calls still go to the compiled kernels."""
        return self.impl is not self.fn

    def __call__(self, *args):
        if self.impl is self.fn:
            return self.fn(*args)
        try:
            return self.impl(*args)
        except Exception as err:
            out = self.fn(*args)
            log.warning("torch.compile of %s failed (%s); VESPO runs its eager path", self.fn.__name__, err)
            self.impl = self.fn
            return out


@functools.cache
def compiled(fn) -> CompiledOrEager:
    return CompiledOrEager(fn)


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
