"""Rollout: vLLM generation engines as Ray actors (see issue: rollout)."""
