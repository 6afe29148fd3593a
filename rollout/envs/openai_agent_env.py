"""`task.env: openai_agent:package.module:function`: agent code written with the OpenAI SDK,
run unchanged as the episode.

The function is `async def run(client: openai.AsyncOpenAI, sample: TaskSample) -> float` (a
plain `def` gets an `openai.OpenAI` client and runs in a thread): it talks to the policy through
`client.chat.completions.create(...)`, runs its own tools, and returns the episode's reward.
The items come from the data file `task.path`, read as the math task reads it (.jsonl or
.parquet; prompt and answer fields found or named by task.prompt_key / answer_key); the agent
receives the file's sample, its `messages` included. The agent writes its own messages, so
`task.system_prompt` and `task.tools` do not apply. `task.env_args` may set `host`, the address
the endpoint binds (default 127.0.0.1; the node's address for an agent running elsewhere).

There is no environment to step: the agent loop sees `agent` and runs
`rollout.openai_agent_episode.run_agent_episode` instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace

from rollout.tasks.base import TaskConfig, TaskSample
from rollout.tasks.math import MathTask


class OpenAIAgents:
    def __init__(self, name: str, cfg: TaskConfig):
        self.name = f"openai_agent:{name}"
        if not cfg.path:
            raise ValueError("task.env openai_agent needs task.path: a .jsonl or .parquet file of the agent's items")
        if cfg.tools:
            raise ValueError("task.tools do not apply to openai_agent: the agent passes its tools in its requests")
        unknown = sorted(set(cfg.env_args) - {"host"})
        if unknown:
            raise ValueError(f"task.env_args for openai_agent: unknown {', '.join(unknown)} (only host is taken)")
        self.host: str = str(cfg.env_args.get("host", "127.0.0.1"))
        self.agent = load_agent(name)
        task = MathTask(cfg)
        self._files = {s.id: s for split in ("train", "eval") for s in task.samples(split)}
        # what the controller hands out: the prompt's text as is (no chat template), the id to find the row again
        self._splits = {split: [replace(s, chat=False, messages=None) for s in task.samples(split)]
                        for split in ("train", "eval")}  # fmt: skip

    def samples(self, split: str) -> list[TaskSample]:
        return self._splits["train" if split == "train" else "eval"]

    def original(self, sample: TaskSample) -> TaskSample:
        """The file's sample behind an item (its messages and chat flag intact)."""
        return self._files.get(sample.id, sample)

    def make(self):
        raise TypeError("openai_agent episodes are played by the agent function, not stepped")


def load_agent(spec: str) -> Callable:
    """The user's `package.module:function`, with a one-line error when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task.env must be openai_agent:package.module:function, got openai_agent:{spec}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module: any import failure is a config error
        raise ValueError(f"task.env openai_agent: cannot import {module_name}: {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"task.env openai_agent: {module_name} has no function {attr!r}")
    return fn
