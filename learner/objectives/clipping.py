"""PPO-style clipped surrogate shared by GRPO and GSPO: they differ only in which ratio they clip."""

from __future__ import annotations

import torch


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max(-A r, -A clip(r)) and a bool map of where the clipped branch won."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped
