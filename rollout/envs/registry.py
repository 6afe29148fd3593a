"""Which environment `task.env` names: "kind:name", each kind an adapter module imported only
when a config names it (the third-party package is needed only then)."""

from __future__ import annotations

import importlib

from rollout.envs.base import EnvFactory
from rollout.tasks.base import TaskConfig

# kind -> "module:class" of its EnvFactory; the class takes (name, task config)
ENVS = {
    "reasoning_gym": "rollout.envs.reasoning_gym_env:ReasoningGymEnvs",
    "textarena": "rollout.envs.textarena_env:TextArenaEnvs",
    "openai_agent": "rollout.envs.openai_agent_env:OpenAIAgents",
}


def make_env_factory(cfg: TaskConfig) -> EnvFactory:
    """The factory of `task.env`, with a one-line error for an unknown kind or a missing package."""
    if not cfg.env:
        raise ValueError("task.env is not set")
    kind, _, name = cfg.env.partition(":")
    if kind not in ENVS:
        raise ValueError(f"task.env: unknown kind {kind!r}; choose one of {', '.join(sorted(ENVS))}")
    module, _, cls = ENVS[kind].partition(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ValueError(f"task.env {cfg.env!r} needs a package that is not installed: {err}") from err
    return factory(name, cfg)
