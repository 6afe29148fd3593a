"""Tasks behind one interface: prompts with reference answers, and a verifiable reward.

A task is chosen by name in the config: "arithmetic" (the toy task the tiny model learns on a
CPU), "math" (JSONL or Parquet rows scored with math-verify), "env" (multi-turn episodes with
the environment `task.env` names, rewarded by it: rollout.envs), or any task whose reward is a
user function named by import path ("package.module:function"). User code is imported only
when the config names it, and runs where rewards are computed: in the rollout process.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rollout.tasks import arithmetic, repeated_addition
from rollout.tasks.base import TASK_NAMES, RewardFn, Task, TaskConfig, TaskSample


class GeneratedTask:
    """A task whose problems are generated from the seed: `train_size` for training, and
    `eval_size` held out, drawn from the next seed."""

    name = ""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def problems(self, count: int, seed: int) -> list:
        raise NotImplementedError

    def samples(self, split: str) -> list[TaskSample]:
        count, seed = (
            (self.cfg.train_size, self.cfg.seed) if split == "train" else (self.cfg.eval_size, self.cfg.seed + 1)
        )
        return [TaskSample(f"{split}-{i}", p.prompt, p.answer, chat=False)
                for i, p in enumerate(self.problems(count, seed))]  # fmt: skip


class ArithmeticTask(GeneratedTask):
    name = "arithmetic"

    def problems(self, count: int, seed: int) -> list:
        return arithmetic.problems(count, seed=seed, max_digits=self.cfg.max_digits)


class RepeatedAdditionTask(GeneratedTask):
    """Long answers: "7x13:" -> "7,13=007 7,12=014 ... 7,01=091" (rollout/tasks/repeated_addition.py)."""

    name = "repeated_addition"

    def problems(self, count: int, seed: int) -> list:
        return repeated_addition.problems(count, seed=seed)


def make_task(cfg: TaskConfig) -> Task:
    return TASKS[cfg.name](cfg)


def make_reward(cfg: TaskConfig) -> RewardFn:
    """The reward of cfg: the user's `reward_fn` if named, else the task's own. Cheap to build
    (no data is read), so each reward worker process builds its own."""
    if cfg.reward_fn:
        return user_reward(cfg.reward_fn)
    return REWARDS[cfg.name]()


def render_prompt(sample: TaskSample, tokenizer, system_prompt: str | None = None) -> str:
    """The text the engine is given: the chat template applied where the task and tokenizer use
    one. A sample's own system turn wins over `task.system_prompt`."""
    if sample.messages is not None:
        messages = [dict(m) for m in sample.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"sample {sample.id!r} is a chat conversation but the tokenizer has no chat template")
    elif not sample.chat or not getattr(tokenizer, "chat_template", None):
        return sample.prompt
    else:
        messages = [{"role": "user", "content": sample.prompt}]
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class ScoredReward:
    value: float
    error: str | None = None  # why the reward is unusable; the sample is then excluded from training


def score(reward: RewardFn, response: str, sample: TaskSample) -> ScoredReward:
    """The reward, with a raising, non-numeric or non-finite one turned into a marked sample.
    Finite means finite in float32, the training dtype: 1e39 is not a usable reward."""
    try:
        raw = reward(response, sample)
    except BaseException as err:  # user code: SystemExit and KeyboardInterrupt included, never crash
        return ScoredReward(0.0, f"reward raised {type(err).__name__}: {err}")
    if isinstance(raw, dict) and "score" in raw:  # veRL compute_score may return {"score": x, ...}
        raw = raw["score"]
    if isinstance(raw, str) or not isinstance(raw, (int, float)) and not hasattr(raw, "__float__"):
        return ScoredReward(0.0, f"reward returned {type(raw).__name__} {raw!r}, not a number")
    try:
        value = float(np.float32(raw))
    except (TypeError, ValueError, OverflowError) as err:
        return ScoredReward(0.0, f"reward returned {raw!r}, not a number: {err}")
    if not math.isfinite(value):
        return ScoredReward(0.0, f"reward returned {raw!r}, not finite in float32")
    return ScoredReward(value)


def user_reward(spec: str) -> RewardFn:
    """A user's reward by import path: fn(response, answer), or veRL's compute_score(data_source,
    solution_str, ground_truth, extra_info=None), told apart by its parameter names."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward_fn {spec!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r} is a {type(fn).__name__}, not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: the plain (response, answer) form
        params = {}
    if "solution_str" in params or "data_source" in params:
        takes_extra = "extra_info" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

        def verl_style(response: str, sample: TaskSample) -> float:
            kwargs = {"extra_info": sample.extra_info} if takes_extra else {}
            return fn(data_source=sample.data_source, solution_str=response, ground_truth=sample.answer, **kwargs)

        return verl_style
    return lambda response, sample: fn(response, sample.answer)


def _math_reward() -> RewardFn:
    from rollout.tasks.math import math_reward

    return math_reward


def _math_task(cfg: TaskConfig) -> Task:
    from rollout.tasks.math import MathTask

    return MathTask(cfg)


def _env_task(cfg: TaskConfig) -> Task:
    from rollout.envs.registry import make_env_factory

    return make_env_factory(cfg)


def _env_reward() -> RewardFn:
    def from_environment(response: str, sample: TaskSample) -> float:
        raise RuntimeError("task.name env: rewards come from the environment's steps, not a reward function")

    return from_environment


TASKS: dict[str, Callable[[TaskConfig], Task]] = {
    "arithmetic": ArithmeticTask,
    "repeated_addition": RepeatedAdditionTask,
    "math": _math_task,
    "env": _env_task,
}
REWARDS: dict[str, Callable[[], RewardFn]] = {
    "arithmetic": lambda: lambda response, sample: arithmetic.reward(response, sample.answer),
    "repeated_addition": lambda: lambda response, sample: repeated_addition.reward(response, sample.answer),
    "math": _math_reward,
    "env": _env_reward,
}
assert set(TASKS) == set(TASK_NAMES) == set(REWARDS), "rollout.tasks.base.TASK_NAMES must name every task"
