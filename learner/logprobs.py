"""Per-token log-probabilities of the tokens actually in the sequence, without the logits.

A full (batch, tokens, vocabulary) float32 logits tensor is what dominates a learner's memory
on real models (4 bytes x 262k = 1 MB per token on a 262k vocabulary), and its log-softmax
backward doubles it. Here the model runs up to its final hidden states only (the output
layer is applied to one position), and the output layer is applied to a chunk of tokens at a
time: each chunk's logits live only while its log-probs are taken, and the backward pass
recomputes them chunk by chunk (activation checkpointing, torch.utils.checkpoint). The
output layer is the model's own module, called as the model calls it, so tied and untied
embeddings, a bias, and ZeRO-3's parameter gathering behave as in the model's own forward.

The model is still called through its DeepSpeed engine, so the engine's backward hooks sit on
the hidden states the log-probs come from. The last position's logits, which the model does
compute, check that the head used here (output layer, then any soft-capping or scaling the
model applies) reproduces the model's own logits: a model whose head does something else is
refused with its name rather than trained on wrong log-probs.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

# Each chunk's float32 logits are at most this many bytes (and at least 16 tokens).
CHUNK_LOGIT_BYTES = 32 << 20


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L-1): log p(input_ids[:, j+1] | input_ids[:, :j+1]); with_entropy: and the entropy of
    each of those next-token distributions (B, L-1), a metric, taken from the same chunks and
    carrying no gradient.

    `temperature` matches the engines' sampling temperature, whose log-probs are of the tempered
    distribution. `position_ids` (and no attention mask) is how packed rows are scored
    (learner.packing). `chunk_tokens`: tokens per chunk of logits (default: CHUNK_LOGIT_BYTES).
    """
    lm = _causal_lm(model)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return full_logits_token_logprobs(model, input_ids, attention_mask, temperature, position_ids, with_entropy)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
        **extra,
    )
    hidden, last_logits = out.hidden_states[-1], out.logits
    del out  # the other layers' hidden states: nothing keeps them unless autograd does
    head = OutputHead(lm)
    head.check(hidden[:, -1:], last_logits)
    b, length, width = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(-1, width)
    flat_targets = input_ids[:, 1:].reshape(-1)
    step = chunk_tokens or max(16, CHUNK_LOGIT_BYTES // (4 * head.vocab_size))
    if not torch.is_grad_enabled() or not flat_hidden.requires_grad:
        with torch.no_grad():
            lp, entropy = _chunks(head, flat_hidden, flat_targets, temperature, step)
    elif head.partitioned:
        lp, entropy = _checkpointed(head, flat_hidden, flat_targets, temperature, step)
    else:
        lp, entropy = ChunkedLogprobs.apply(
            flat_hidden, head.layer.weight, head.layer.bias, flat_targets, head, temperature, step
        )
    shape = (b, max(length - 1, 0))
    return (lp.view(shape), entropy.view(shape)) if with_entropy else lp.view(shape)


def _chunks(head, hidden, targets, temperature, step) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_head_logprobs(head, hidden[i : i + step], targets[i : i + step], temperature)
             for i in range(0, hidden.shape[0], step)]  # fmt: skip
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class ChunkedLogprobs(torch.autograd.Function):
    """Log-probs of `targets` under head(hidden), one chunk of tokens at a time. Saves only the
    hidden states; the backward recomputes each chunk's logits once, differentiates the cheap
    element-wise part (post-processing, temperature, log-softmax) with autograd, and does the
    two matrix products itself: the output layer's gradient is accumulated in place in one
    buffer rather than one vocabulary-sized gradient per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, temperature, step):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.head, ctx.temperature, ctx.step = head, temperature, step
        with torch.no_grad():
            lp, entropy = _chunks(head, hidden, targets, temperature, step)
        ctx.mark_non_differentiable(entropy)
        return lp, entropy

    @staticmethod
    def backward(ctx, grad_lp, _grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        head, step = ctx.head, ctx.step
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for i in range(0, hidden.shape[0], step):
            h = hidden[i : i + step]
            with torch.enable_grad():
                z = torch.nn.functional.linear(h, weight, bias).detach().requires_grad_()
                lp, _ = _logprobs(head.post(z), targets[i : i + step], ctx.temperature, entropy=False)
                (grad_z,) = torch.autograd.grad(lp, z, grad_lp[i : i + step])
            if grad_hidden is not None:
                torch.mm(grad_z, weight, out=grad_hidden[i : i + step])
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.t(), h)
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _checkpointed(head, hidden, targets, temperature, step):
    """Under ZeRO-3 the output layer's weight exists whole only while its module runs: call the
    module per chunk and let activation checkpointing recompute the chunk in the backward pass."""
    parts = [checkpoint(_head_logprobs, head, hidden[i : i + step], targets[i : i + step], temperature,
                        use_reentrant=False) for i in range(0, hidden.shape[0], step)]  # fmt: skip
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def full_logits_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs from the model's logits of every position at once: for models whose forward
    cannot stop short of the logits (no `logits_to_keep`), and the baseline bench.learner_memory
    measures against."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    lp, entropy = _logprobs(logits[:, :-1], input_ids[:, 1:], temperature, entropy=with_entropy)
    return (lp, entropy) if with_entropy else lp


class OutputHead:
    """The causal LM's output layer plus what its forward applies after it (soft-capping as in
    Gemma, a logit scale as in Cohere, a divisor as in Granite)."""

    def __init__(self, lm: torch.nn.Module):
        self.layer = lm.get_output_embeddings()
        config = lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(lm, "logit_scale", None) or getattr(config, "logit_scale", None)
        self.divisor = getattr(config, "logits_scaling", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or self.layer.weight.shape[0] or 1)
        self.name = type(lm).__name__

    @property
    def partitioned(self) -> bool:
        """ZeRO-3 holds the weight in shards between the module's own calls."""
        return hasattr(self.layer.weight, "ds_id")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.post(self.layer(hidden))

    def post(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def check(self, last_hidden: torch.Tensor, model_logits: torch.Tensor) -> None:
        mine = self(last_hidden).float()
        theirs = model_logits.float()
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"{self.name}: its logits are not its output layer applied to its final hidden states "
                "(an output head this learner does not know); chunked log-probs would be wrong"
            )


def _head_logprobs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
    return _logprobs(head(hidden), targets, temperature)


def _logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs of targets, entropy or None). logsumexp + gather rather than a log_softmax: one
    logits-sized tensor instead of two."""
    logits = logits.float()
    if temperature != 1.0:  # the policy is the distribution the engines sample from
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return lp, None
    with torch.no_grad():
        z = logits.detach()
        return lp, lse.detach() - (torch.softmax(z, -1) * z).sum(-1)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)
