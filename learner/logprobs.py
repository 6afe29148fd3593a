"""Per-token log-probabilities of the tokens actually in the sequence."""

from __future__ import annotations

import torch


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L-1): log p(input_ids[:, j+1] | input_ids[:, :j+1]).

    logsumexp + gather instead of a full log_softmax keeps one (B, L, V) tensor alive rather
    than two: the vocabulary dimension dominates memory for real models. `temperature` matches
    the engines' sampling temperature, whose log-probs are of the tempered distribution.
    `position_ids` (and no attention mask) is how packed rows are scored (learner.packing).
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits[:, :-1]
    logits = logits.float()
    if temperature != 1.0:  # the policy is the distribution the engines sample from
        logits = logits / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
