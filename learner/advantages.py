"""Advantage estimators: how a response's reward becomes its learning signal.

All n responses sampled for one prompt share a group id, and every estimator here scores a
response against its siblings, so no value model is needed:

- "grpo": reward minus the group mean, divided by the group std + 1e-6 unless
  `learner.normalize_adv_std` is false (then it is Dr. GRPO's plain centred reward);
- "rloo": reward minus the mean of the *other* responses (leave-one-out), an unbiased baseline.

A group of one has no siblings to compare with: its advantage is 0 (no learning signal).
Choose one with `learner.advantage`; add one by writing a function of (rewards, group ids,
normalize_std) and putting it in ADVANTAGES.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

STD_EPS = 1e-6


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    normalize_std: bool = True,
) -> torch.Tensor:
    """Per-sequence advantages, shape (batch,), float32."""
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    index = _group_index(group_ids, r.numel())
    n_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups).index_add_(0, index, r) / count
    centred = r - mean[index]
    if not normalize_std:
        return centred
    # Unbiased std within each group, as torch.std computes it; singletons have centred == 0.
    sq = torch.zeros(n_groups).index_add_(0, index, centred.square())
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return centred / (std[index] + STD_EPS)


def leave_one_out_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    normalize_std: bool = False,
) -> torch.Tensor:
    """RLOO: r_i - mean of the group's other rewards = n / (n - 1) x (r_i - group mean). The
    baseline does not contain the response itself, so the estimate is unbiased.
    `normalize_std` does not apply (it is accepted so every estimator has one signature)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    index = _group_index(group_ids, r.numel())
    n_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups).index_add_(0, index, r) / count
    n = count[index]
    return torch.where(n > 1, (r - mean[index]) * n / (n - 1).clamp(min=1), torch.zeros_like(r))


Estimator = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, Estimator] = {"grpo": group_advantages, "rloo": leave_one_out_advantages}


def advantages(
    name: str, rewards: Sequence[float] | torch.Tensor, group_ids: Sequence[Hashable], normalize_std: bool = True
) -> torch.Tensor:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name](rewards, group_ids, normalize_std)


def _group_index(group_ids: torch.Tensor | Sequence[Hashable], n: int) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.reshape(-1)
        if ids.numel() != n:
            raise ValueError(f"got {ids.numel()} group ids for {n} rewards")
        return torch.unique(ids, return_inverse=True)[1]
    if len(group_ids) != n:
        raise ValueError(f"got {len(group_ids)} group ids for {n} rewards")
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)
