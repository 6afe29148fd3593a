"""The DeepSpeed config the learner runs with, derived from LearnerConfig.

Gradient accumulation is caller-owned (`managed_gradient_accumulation: false`): the number of
micro-batches per step follows the token budget and varies from step to step, so the learner
calls backward once per micro-batch with the loss already weighted for exact aggregation,
and step() once at the end.
"""

from __future__ import annotations

from typing import Any

from learner.config import LearnerConfig


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
