"""Scoring held-out generations: the one place `eval/*` during training and `vespo eval` agree on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from buffer.trajectory import Trajectory
from vespo.reporting.episode_stats import episode_metrics


@dataclass
class Score:
    mean_reward: float
    accuracy: float  # share of samples with reward >= 1
    pass_at_k: float  # share of prompts with at least one sample at reward >= 1
    prompts: int
    mean_response_tokens: float
    reward_errors: list[str]  # the failures of samples whose reward failed (they score 0)
    episodes: dict[str, float]  # multi-turn tasks: episode_stats.episode_metrics; else empty


def score(trajectories: list[Trajectory]) -> Score:
    rewards = np.array([t.reward for t in trajectories], dtype=np.float64)
    by_group: dict[str, list[float]] = {}
    for t in trajectories:
        by_group.setdefault(t.group_id, []).append(t.reward)
    nan = float("nan")
    return Score(
        mean_reward=float(rewards.mean()) if len(rewards) else nan,
        accuracy=float((rewards >= 1.0).mean()) if len(rewards) else nan,
        pass_at_k=float(np.mean([max(r) >= 1.0 for r in by_group.values()])) if by_group else nan,
        prompts=len(by_group),
        mean_response_tokens=float(np.mean([len(t.response_ids) for t in trajectories])) if trajectories else 0.0,
        reward_errors=[t.extra["reward_error"] for t in trajectories if "reward_error" in t.extra],
        episodes=episode_metrics(trajectories),
    )
