"""Learner configuration: one typed record, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from learner.objectives import AGG_MODES, OBJECTIVES, make_config


@dataclass
class LearnerConfig:
    model_path: str = ""  # a local Hugging Face causal-LM directory (the run config fills it from `model`)
    world_size: int = 1  # DeepSpeed data-parallel processes (one Ray actor each)
    zero_stage: int = 0  # 0-3
    objective: str = "vespo"
    objective_config: dict[str, Any] = field(default_factory=dict)  # options of that objective
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    micro_batch_tokens: int = 8192  # token budget (rows x padded length) of one forward/backward
    bf16: bool = False  # on GPU: bf16 weights and activations with fp32 master weights
    seed: int = 0
    temperature: float = 1.0  # the rollout sampling temperature: log-probs are of the tempered policy
    normalize_adv_std: bool = True  # GRPO advantages divided by the group std
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        make_config(self.objective, self.objective_config)  # raises on unknown or invalid options
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (greedy rollouts have no log-probs to train on), got {self.temperature}"
            )
        if self.lr <= 0 or self.micro_batch_tokens <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr and micro_batch_tokens must be > 0, warmup_steps and grad_clip >= 0")

    @property
    def agg(self) -> str:
        agg = make_config(self.objective, self.objective_config).agg
        assert agg in AGG_MODES
        return agg
