"""GRPO group-relative advantages: each response is scored against its siblings.

All n responses sampled for one prompt share a group id; the advantage of a response is its
reward minus the group mean, optionally divided by the group std + 1e-6. A group of one has
no siblings to compare with, so its advantage is 0 (it carries no learning signal).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

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
