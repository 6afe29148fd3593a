"""The policy objectives: VESPO and the baselines it is compared with, behind one signature.

    loss, metrics = compute_loss(name, logprobs, behavior_logprobs, advantages, mask,
                                 config=None, rollout_is_weights=None)

Tensors are (batch, tokens). `logprobs` are the current policy's (they carry the gradient),
`behavior_logprobs` those of the engine that sampled the tokens, `advantages` are per token
(a sequence advantage broadcast over its tokens), `mask` marks response tokens. Masked
positions may hold any finite value. Computation runs in float32 whatever the input dtype,
and the loss is a float32 scalar. `rollout_is_weights` are per-token pi_old / pi_sampler
weights for train/inference mismatch correction: VESPO folds their log into the sequence
weight, the token-level baselines multiply each token's loss by them.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch

from configtypes import ConfigError, build, keys_of
from learner.objectives.aggregation import AGG_MODES, aggregate
from learner.objectives.cispo import CispoConfig, cispo_objective
from learner.objectives.fused import prepare_fused
from learner.objectives.grpo import GrpoConfig, grpo_objective
from learner.objectives.gspo import GspoConfig, gspo_objective
from learner.objectives.inputs import PolicyBatch, prepare
from learner.objectives.sapo import SapoConfig, sapo_objective
from learner.objectives.vespo import VespoConfig, phi, vespo_objective

ObjectiveConfig = VespoConfig | GrpoConfig | GspoConfig | SapoConfig | CispoConfig

CONFIGS: dict[str, type[ObjectiveConfig]] = {
    "vespo": VespoConfig,
    "grpo": GrpoConfig,
    "gspo": GspoConfig,
    "sapo": SapoConfig,
    "cispo": CispoConfig,
}
OBJECTIVES = tuple(CONFIGS)


def make_config(name: str, config: ObjectiveConfig | Mapping[str, Any] | None = None) -> ObjectiveConfig:
    """The typed config for objective `name` from None (defaults), a mapping (`learner.objective_config`,
    validated like every other section) or a config."""
    cls = _config_class(name)
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        known = keys_of(cls)
        unknown = sorted(map(str, set(config) - set(known)))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid options: {known}"
            raise ConfigError(f"learner.objective_config: unknown {name} option(s) {unknown}; {hint}")
        return build(cls, dict(config))
    raise TypeError(f"config for {name!r} must be {cls.__name__}, a mapping or None, got {type(config).__name__}")


def compute_loss(
    name: str,
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: ObjectiveConfig | Mapping[str, Any] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = make_config(name, config)
    if rollout_is_weights is not None and rollout_is_weights.shape != logprobs.shape:
        raise ValueError(
            f"rollout_is_weights has shape {tuple(rollout_is_weights.shape)}, expected {tuple(logprobs.shape)}"
        )
    fused = isinstance(cfg, VespoConfig) and cfg.fused
    batch = (prepare_fused if fused else prepare)(logprobs, behavior_logprobs, advantages, mask)
    if name == "vespo":
        return vespo_objective(batch, cfg, rollout_is_weights)
    if name == "grpo":
        return grpo_objective(batch, cfg, rollout_is_weights)
    if name == "gspo":
        return gspo_objective(batch, cfg, rollout_is_weights)
    if name == "sapo":
        return sapo_objective(batch, cfg, rollout_is_weights)
    return cispo_objective(batch, cfg, rollout_is_weights)


def vespo_loss(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    agg: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VESPO with its kernel shapes as keyword arguments (the spec's released defaults)."""
    cfg = VespoConfig(k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg, agg=agg)
    return compute_loss("vespo", logprobs, behavior_logprobs, advantages, mask, cfg, rollout_is_weights)


def check_objective(name: str) -> str:
    _config_class(name)
    return name


def _config_class(name: str) -> type[ObjectiveConfig]:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


__all__ = [
    "AGG_MODES",
    "OBJECTIVES",
    "CispoConfig",
    "GrpoConfig",
    "GspoConfig",
    "ObjectiveConfig",
    "PolicyBatch",
    "SapoConfig",
    "VespoConfig",
    "aggregate",
    "check_objective",
    "compute_loss",
    "make_config",
    "phi",
    "vespo_loss",
]
