"""Multi-turn episodes (task.name env) in numbers: turns, tool use, and where their time went.
Training steps log them under `episode/`, held-out evaluations under `eval/episode/`."""

from __future__ import annotations

import numpy as np


def episode_metrics(trajs) -> dict[str, float]:
    """Multi-turn episodes (task.name env): turns, tool use, and where their time went."""
    episodes = [t for t in trajs if "turns" in t.extra]
    if not episodes:
        return {}
    env_s = np.array([t.timings.get("env", 0.0) for t in episodes])
    gen_s = np.array([t.timings.get("generate", 0.0) for t in episodes])
    return {
        "episode/turns_mean": float(np.mean([t.extra["turns"] for t in episodes])),
        "episode/turns_max": float(max(t.extra["turns"] for t in episodes)),
        "episode/tool_calls_mean": float(np.mean([t.extra["tool_calls"] for t in episodes])),
        "episode/tool_errors_mean": float(np.mean([t.extra["tool_errors"] for t in episodes])),
        "episode/used_tools_frac": float(np.mean([t.extra["tool_calls"] > 0 for t in episodes])),
        "episode/latency_s_mean": float(np.mean(env_s + gen_s)),
        "episode/latency_s_max": float(np.max(env_s + gen_s)),
        "episode/env_s_mean": float(env_s.mean()),
        "episode/generate_s_mean": float(gen_s.mean()),
        "episode/env_time_frac": float(env_s.sum() / max(env_s.sum() + gen_s.sum(), 1e-9)),
        "episode/model_tokens_mean": float(np.mean([t.model_tokens for t in episodes])),
    }
