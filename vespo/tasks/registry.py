"""Tasks behind one interface: prompts with reference answers, and a verifiable reward.

A task is chosen by name in the config: "arithmetic" (the toy task the tiny model learns on a
CPU), "math" (JSONL or Parquet rows scored with math-verify), or any task whose reward is a
user function named by import path ("package.module:function"). User code is imported only
when the config names it, and runs where rewards are computed: in the rollout process.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vespo.tasks import arithmetic


@dataclass(frozen=True)
class TaskSample:
    id: str
    prompt: str  # the user turn (raw text for tasks that take no chat template)
    answer: str
    chat: bool = True  # render through the tokenizer's chat template, if it has one


class Task(Protocol):
    name: str

    def samples(self, split: str) -> list[TaskSample]: ...

    def reward(self, response: str, sample: TaskSample) -> float: ...


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # arithmetic | math
    path: str | None = None  # math: a .jsonl or .parquet file of rows
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    system_prompt: str | None = None
    eval_fraction: float = 0.1  # the last rows of the file (math) form the held-out split
    train_size: int = 4096  # arithmetic: problems per split
    eval_size: int = 256
    max_digits: int = 2
    seed: int = 0
    reward_fn: str | None = None  # "module:function(response, answer) -> float", replaces the task's reward

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(sorted(TASKS))}")
        if self.name == "math" and not self.path:
            raise ValueError("the math task needs task.path: a .jsonl or .parquet file with prompt and answer")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.reward_fn is not None and ":" not in self.reward_fn:
            raise ValueError(f"reward_fn must be 'module:function', got {self.reward_fn!r}")


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def samples(self, split: str) -> list[TaskSample]:
        count, seed = (
            (self.cfg.train_size, self.cfg.seed) if split == "train" else (self.cfg.eval_size, self.cfg.seed + 1)
        )
        problems = arithmetic.problems(count, seed=seed, max_digits=self.cfg.max_digits)
        return [TaskSample(f"{split}-{i}", p.prompt, p.answer, chat=False) for i, p in enumerate(problems)]

    def reward(self, response: str, sample: TaskSample) -> float:
        return arithmetic.reward(response, sample.answer)


def make_task(cfg: TaskConfig) -> Task:
    task = TASKS[cfg.name](cfg)
    if cfg.reward_fn:
        task.reward = _user_reward(cfg.reward_fn)  # type: ignore[method-assign]
    return task


def render_prompt(sample: TaskSample, tokenizer, system_prompt: str | None = None) -> str:
    """The text the engine is given: the chat template applied where the task and tokenizer use one."""
    if not sample.chat or not getattr(tokenizer, "chat_template", None):
        return sample.prompt
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": sample.prompt}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class ScoredReward:
    value: float
    error: str | None = None  # why the reward is unusable; the sample is then excluded from training


def score(task: Task, response: str, sample: TaskSample) -> ScoredReward:
    """The task's reward, with a raising or non-finite reward turned into a marked sample."""
    try:
        value = float(task.reward(response, sample))
    except Exception as err:  # user reward code: report, never crash the engine
        return ScoredReward(0.0, f"reward raised {type(err).__name__}: {err}")
    if not math.isfinite(value):
        return ScoredReward(0.0, f"reward returned {value}")
    return ScoredReward(value)


def _user_reward(spec: str) -> Callable[[str, TaskSample], float]:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward_fn {spec!r}: {err}") from err
    return lambda response, sample: fn(response, sample.answer)


def _math_task(cfg: TaskConfig) -> Task:
    from vespo.tasks.math import MathTask

    return MathTask(cfg)


TASKS: dict[str, Callable[[TaskConfig], Task]] = {"arithmetic": ArithmeticTask, "math": _math_task}
