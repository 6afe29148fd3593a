"""Per-token log-probabilities of the tokens actually in the sequence."""

from __future__ import annotations

import torch


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """(B, L-1): log p(input_ids[:, j+1] | input_ids[:, :j+1]).

    logsumexp + gather instead of a full log_softmax keeps one (B, L, V) tensor alive rather
    than two: the vocabulary dimension dominates memory for real models. `temperature` matches
    the engines' sampling temperature, whose log-probs are of the tempered distribution.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    if temperature != 1.0:  # the policy is the distribution the engines sample from
        logits = logits / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
