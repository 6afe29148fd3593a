"""Per-token log-probabilities of the tokens actually in the sequence, without the logits.

A full (batch, tokens, vocabulary) float32 logits tensor is what dominates a learner's memory
on real models (4 bytes x 262k = 1 MB per token on a 262k vocabulary), and its log-softmax
backward doubles it. Here the model runs up to its final hidden states only (the output
layer is applied to one position), and the output layer is applied one slice of the
vocabulary at a time to every token: a running (online) logsumexp carries the normaliser
across slices, so only one slice's logits exist at once, and the backward pass recomputes
each slice from the saved hidden states and logsumexp. Slicing the vocabulary rather than the
tokens reads the output layer's weight once per pass and writes each slice of its gradient
once, so the matrix products stay as large and as few as the full logits' (a token-sliced
version ran 1.8x slower on a 262k vocabulary, streaming the whole weight once per chunk).

The model is still called through its DeepSpeed engine, so the engine's backward hooks sit on
the hidden states the log-probs come from. Under ZeRO-3 the output layer's weight is whole
only while its own module runs: there the module is called on chunks of tokens under
activation checkpointing instead. The last position's logits, which the model does compute,
check that the head used here (output layer, then any soft-capping or scaling the model
applies) reproduces the model's own logits: a model whose head does something else is
refused with its name rather than trained on wrong log-probs.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

# One slice's float32 logits are at most this many bytes.
CHUNK_LOGIT_BYTES = 32 << 20


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_LOGIT_BYTES,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L-1): log p(input_ids[:, j+1] | input_ids[:, :j+1]); with_entropy: and the entropy of
    each of those next-token distributions (B, L-1), a metric, taken from the same slices and
    carrying no gradient.

    `temperature` matches the engines' sampling temperature, whose log-probs are of the tempered
    distribution. `position_ids` (and no attention mask) is how packed rows are scored
    (learner.packing). `chunk_bytes`: the float32 logits that may exist at once.
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
    tokens = max(flat_hidden.shape[0], 1)
    if head.partitioned and head.layer.weight.requires_grad:
        step = max(1, chunk_bytes // (4 * head.vocab_size))
        lp, entropy = _token_chunks(head, flat_hidden, flat_targets, temperature, step, with_entropy)
    else:
        step = max(1, chunk_bytes // (4 * tokens))
        weight, bias = head.frozen_whole() if head.partitioned else (head.layer.weight, head.layer.bias)
        lp, entropy = VocabSlicedLogprobs.apply(
            flat_hidden, weight, bias, flat_targets, head, temperature, step, with_entropy
        )
    shape = (b, max(length - 1, 0))
    return (lp.view(shape), entropy.view(shape)) if with_entropy else lp.view(shape)


class VocabSlicedLogprobs(torch.autograd.Function):
    """Log-probs of `targets` under head(hidden), one vocabulary slice at a time. Saves the hidden
    states and each token's logsumexp; the backward recomputes each slice's logits once, takes
    the softmax from the saved logsumexp, differentiates the element-wise part (post-processing,
    temperature) with autograd where there is one, and does the two matrix products itself."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, temperature, step, with_entropy):
        n = hidden.shape[0]
        peak = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
        total = hidden.new_zeros(n, dtype=torch.float32)  # sum of exp(z - peak)
        weighted = hidden.new_zeros(n, dtype=torch.float32)  # sum of exp(z - peak) * z, for the entropy
        target_logit = hidden.new_zeros(n, dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, weight.shape[0], step):
                z = _slice_logits(head, hidden, weight, bias, start, step, temperature)
                inside = (targets >= start) & (targets < start + z.shape[1])
                picked = z.gather(1, (targets - start).clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
                new_peak = torch.maximum(peak, z.amax(1))
                rescale = torch.exp(peak - new_peak)
                e = torch.exp(z - new_peak.unsqueeze(1))
                total = total * rescale + e.sum(1)
                if with_entropy:
                    weighted = weighted * rescale + (e * z).sum(1)
                peak = new_peak
            lse = peak + torch.log(total)
            entropy = lse - weighted / total if with_entropy else torch.zeros_like(lse)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.head, ctx.temperature, ctx.step = head, temperature, step
        ctx.mark_non_differentiable(entropy)
        return target_logit - lse, entropy

    @staticmethod
    def backward(ctx, grad_lp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        head, step, temperature = ctx.head, ctx.step, ctx.temperature
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_weight = torch.empty_like(weight) if want_w else None
        grad_bias = torch.empty_like(bias) if bias is not None and want_b else None
        g = grad_lp.float()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for start in range(0, weight.shape[0], step):
            w = weight[start : start + step]
            raw = torch.nn.functional.linear(hidden, w, None if bias is None else bias[start : start + step])
            with torch.enable_grad():
                raw = raw.detach().requires_grad_(not head.plain or temperature != 1.0)
                z = _tempered(head, raw, temperature)
            # d lp / d z = onehot(target) - softmax(z), scaled by each token's incoming gradient
            grad_z = z.detach().sub(lse.unsqueeze(1)) if raw.requires_grad else z.sub_(lse.unsqueeze(1))
            grad_z = grad_z.exp_().mul_(-g.unsqueeze(1))
            inside = (targets >= start) & (targets < start + w.shape[0])
            grad_z[rows[inside], targets[inside] - start] += g[inside]
            if raw.requires_grad:
                (grad_z,) = torch.autograd.grad(z, raw, grad_z)
            grad_z = grad_z.to(weight.dtype)
            if grad_hidden is not None:  # summed over slices in float32
                grad_hidden.addmm_(grad_z.float(), w.float())
            if grad_weight is not None:
                torch.mm(grad_z.t(), hidden, out=grad_weight[start : start + step])
            if grad_bias is not None:
                grad_bias[start : start + step] = grad_z.sum(0)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _slice_logits(head, hidden, weight, bias, start, step, temperature) -> torch.Tensor:
    """float32 tempered logits of vocabulary rows start..start+step for every token."""
    b = None if bias is None else bias[start : start + step]
    return _tempered(head, torch.nn.functional.linear(hidden, weight[start : start + step], b), temperature)


def _tempered(head, raw: torch.Tensor, temperature: float) -> torch.Tensor:
    """The head's post-processing of raw output-layer values, in float32, over the temperature."""
    z = head.post(raw).float()
    return z / temperature if temperature != 1.0 else z


def _joined(parts: list, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not parts:
        empty = like.new_zeros(0, dtype=torch.float32)
        return empty, empty
    lp = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else torch.zeros_like(lp)
    return lp, entropy.detach()


def _token_chunks(head, hidden, targets, temperature, step, entropy):
    """ZeRO-3: the head module per chunk of tokens, each recomputed in the backward pass when a
    gradient will flow (activation checkpointing), without a graph otherwise."""
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            parts = [_head_logprobs(head, hidden[i : i + step], targets[i : i + step], temperature, entropy)
                     for i in range(0, hidden.shape[0], step)]  # fmt: skip
        return _joined(parts, hidden)
    parts = [checkpoint(_head_logprobs, head, hidden[i : i + step], targets[i : i + step], temperature, entropy,
                        use_reentrant=False) for i in range(0, hidden.shape[0], step)]  # fmt: skip
    return _joined(parts, hidden)


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
    lp, entropy = _logprobs(logits[:, :-1], input_ids[:, 1:], temperature, with_entropy)
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
    def plain(self) -> bool:
        """No post-processing after the output layer."""
        return self.scale is None and self.divisor is None and self.softcap is None

    @property
    def partitioned(self) -> bool:
        """ZeRO-3 holds the weight in shards between the module's own calls."""
        return hasattr(self.layer.weight, "ds_id")

    def frozen_whole(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A partitioned output layer that takes no gradient (ZeRO-3 under learner.lora), gathered
        once and copied: the vocabulary slices then run on it as on a resident one (re-running the
        module in a checkpointed backward would find it partitioned again)."""
        import deepspeed

        layer = self.layer
        with deepspeed.zero.GatheredParameters([p for p in (layer.weight, layer.bias) if p is not None]):
            return layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()

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


def _head_logprobs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    return _logprobs(head(hidden), targets, temperature, entropy)


def _logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
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
    """The Hugging Face model inside a DeepSpeed engine (or the model itself), and inside a PEFT
    wrapper (learner.lora), whose own forward passes `logits_to_keep` on but does not declare it."""
    from learner.lora import base_module

    return base_module(getattr(model, "module", model))
