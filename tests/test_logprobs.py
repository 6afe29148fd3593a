"""Chunked log-probs (learner.logprobs) agree with log-probs taken from the model's full logits:
values and every parameter's gradient, tied and untied output layers, padded and packed rows,
any temperature, and models that post-process their logits."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from learner.logprobs import OutputHead, token_logprobs
from learner.packing import pack, packed_token_logprobs, plan

TOL = 1e-5


def llama(tied: bool, vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def gemma2() -> Gemma2ForCausalLM:
    """Soft-capped logits (final_logit_softcapping), the post-processing a head must repeat."""
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                       num_attention_heads=4, num_key_value_heads=2, final_logit_softcapping=5.0)  # fmt: skip
    return Gemma2ForCausalLM(cfg).float()


def full_logits_logprobs(model, input_ids, attention_mask, temperature=1.0, position_ids=None):
    """The reference: every position's logits at once, as the model returns them."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits[:, :-1].float()
    logits = logits / temperature
    return logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def padded_batch(vocab: int = 300):
    torch.manual_seed(1)
    lengths = [9, 5, 12, 3]
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask, lengths


def grads_of(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    lp = fn()
    weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # a loss that weighs every token differently
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (lp_a, g_a), (lp_b, g_b) = a, b
    assert torch.allclose(lp_a, lp_b, atol=TOL, rtol=0), (lp_a - lp_b).abs().max()
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        assert torch.allclose(g_a[name], g_b[name], atol=TOL, rtol=0), (name, (g_a[name] - g_b[name]).abs().max())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_padded_rows_match_full_logits_in_values_and_gradients(tied, temperature):
    model = llama(tied)
    ids, mask, _ = padded_batch()
    chunked = grads_of(model, lambda: token_logprobs(model, ids, mask, temperature, chunk_bytes=1000))
    full = grads_of(model, lambda: full_logits_logprobs(model, ids, mask, temperature))
    assert_same(chunked, full)
    assert model.lm_head.weight.grad is not None  # the output layer learns through the chunks


@pytest.mark.parametrize("tied", [True, False])
def test_packed_rows_match_full_logits_in_values_and_gradients(tied):
    model = llama(tied)
    ids, mask, lengths = padded_batch()
    rows = plan(lengths, token_budget=16)
    (micro,) = [m for m in rows if len(m) > 1][:1] or rows[:1]
    order = [i for row in micro for i in row]
    local, k = [], 0
    for row in micro:
        local.append(list(range(k, k + len(row))))
        k += len(row)
    packed = pack(ids[order], [lengths[i] for i in order], local)
    chunked = grads_of(model, lambda: packed_token_logprobs(model, packed, 0.8))

    def reference():
        lp = full_logits_logprobs(model, packed.input_ids, None, 0.8, packed.position_ids)
        return torch.cat([lp.reshape(-1), lp.new_zeros(1)])[packed.source]

    assert_same(chunked, grads_of(model, reference))


def test_chunk_size_does_not_change_the_result_and_no_grad_matches():
    model = llama(tied=True)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        whole = full_logits_logprobs(model, ids, mask)
        for chunk in (1, 500, 4000, 10**9):  # one vocabulary entry per slice .. all of it at once
            assert torch.allclose(token_logprobs(model, ids, mask, chunk_bytes=chunk), whole, atol=TOL, rtol=0)


def test_soft_capped_logits_are_repeated_by_the_head():
    model = gemma2()
    ids, mask, _ = padded_batch()
    assert_same(grads_of(model, lambda: token_logprobs(model, ids, mask, 0.9, chunk_bytes=700)),
                grads_of(model, lambda: full_logits_logprobs(model, ids, mask, 0.9)))  # fmt: skip


def test_a_head_that_does_something_unknown_is_refused():
    model = llama(tied=False)
    ids, mask, _ = padded_batch()
    head = OutputHead(model)
    head.softcap = 3.0  # pretend this is what the head does: the model's own logits disagree
    with pytest.raises(ValueError, match="LlamaForCausalLM: its logits are not its output layer"):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            head.check(out.hidden_states[-1][:, -1:], out.logits)


def test_the_zero3_path_checkpoints_the_head_module_and_matches(monkeypatch):
    """Under ZeRO-3 the head's weight is whole only inside its module's call: that path calls the
    module per chunk under activation checkpointing, with the same values and gradients."""
    monkeypatch.setattr(OutputHead, "partitioned", property(lambda self: True))
    model = llama(tied=True)
    ids, mask, _ = padded_batch()
    assert_same(grads_of(model, lambda: token_logprobs(model, ids, mask, 0.7, chunk_bytes=6000)),
                grads_of(model, lambda: full_logits_logprobs(model, ids, mask, 0.7)))  # fmt: skip


@pytest.mark.parametrize("chunked", [True, False])
def test_entropy_is_that_of_the_tempered_next_token_distribution(chunked, monkeypatch):
    if not chunked:  # a model whose forward cannot stop short of the logits takes them whole
        monkeypatch.setattr("learner.logprobs.inspect.signature", lambda fn: inspect.Signature())
    model = llama(tied=False)
    ids, mask, _ = padded_batch()
    lp, entropy = token_logprobs(model, ids, mask, 0.7, chunk_bytes=700, with_entropy=True)
    with torch.no_grad():
        logp = (model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / 0.7).log_softmax(-1)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=TOL, rtol=0)
    assert torch.allclose(lp.detach(), full_logits_logprobs(model, ids, mask, 0.7), atol=TOL, rtol=0)
    assert not entropy.requires_grad and lp.requires_grad
