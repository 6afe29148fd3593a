"""Rollout: generation engines (vLLM, or transformers as a fallback) as Ray actors.

`RolloutActor` owns one engine, samples n responses per prompt, tags every token with the
policy version it was sampled under, scores responses with the task's reward and pushes
`buffer.Trajectory` records to the replay buffer. Weights arrive in place over the learner's
weight group (`weightsync.transport`) or, as a fallback, through Ray's object store.
"""

from rollout.config import RolloutConfig
from rollout.records import Completion, PromptItem, RolloutResult

__all__ = ["Completion", "PromptItem", "RolloutConfig", "RolloutResult"]
