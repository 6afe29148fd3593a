"""What every task shares: the sample record, the task interface and the `task` config section.

The registry (which task a name means) and the tasks themselves both build on these, so they
live apart from both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, Field

from configtypes import AtLeast0, AtLeast1, ConfigError, NonEmpty, Positive, section


@dataclass(frozen=True)
class TaskSample:
    id: str
    prompt: str  # the user turn (raw text for tasks that take no chat template)
    answer: str  # the reference answer the reward compares with (veRL: reward_model.ground_truth)
    chat: bool = True  # render through the tokenizer's chat template, if it has one
    # a whole conversation to render instead of `prompt` (veRL `prompt`, OpenAI `messages`):
    # [{"role": "system" | "user" | "assistant", "content": str}, ...], system turns included
    messages: tuple[dict, ...] | None = None
    data_source: str = ""  # veRL's data_source column: which reward a compute_score should apply
    extra_info: dict | None = None  # veRL's extra_info column, handed to compute_score as is


class Task(Protocol):
    """Where the prompts come from. The reward is separate (`make_reward`): it is built again
    in every reward worker process, which must not re-read the data."""

    name: str

    def samples(self, split: str) -> list[TaskSample]: ...


RewardFn = Callable[[str, TaskSample], float]


# the tasks `rollout.tasks.registry` builds (its TASKS must name exactly these); "env" is
# the multi-turn one: its samples and rewards come from the environment `task.env` names
TASK_NAMES = ("arithmetic", "math", "repeated_addition", "env")


def _known_task(name: str) -> str:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return name


def _env_name(spec: str) -> str:
    kind, _, name = spec.partition(":")
    if not kind or not name:
        raise ValueError(f"must be 'kind:name' (e.g. reasoning_gym:products, textarena:GuessTheNumber-v0): {spec!r}")
    return spec


def _tools(specs: list[str]) -> list[str]:
    from rollout.tools.registry import check_tool_specs

    check_tool_specs(specs)
    return specs


def _import_path(spec: str) -> str:
    module, _, function = spec.partition(":")
    if not module or not function:
        raise ValueError(f"must be 'module:function', got {spec!r}")
    return spec


@section("task")
class TaskConfig:
    name: Annotated[str, AfterValidator(_known_task)] = "arithmetic"  # arithmetic | repeated_addition | math | env
    path: NonEmpty | None = None  # math: a .jsonl or .parquet file of rows
    # math: the fields holding prompt and answer, dotted paths allowed ("reward_model.ground_truth");
    # None finds them from the first row (tasks/datasets.py: PROMPT_KEYS, ANSWER_KEYS; docs/data.md)
    prompt_key: NonEmpty | None = None
    answer_key: NonEmpty | None = None
    system_prompt: str | None = None
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1  # the last rows of the file (math) form the held-out split
    train_size: AtLeast1 = 4096  # arithmetic, repeated_addition: problems per split
    eval_size: AtLeast1 = 256
    max_digits: AtLeast1 = 2  # arithmetic: operands below 10**max_digits
    seed: AtLeast0 = 0
    # "module:function", replaces the task's reward: fn(response, answer) -> float, or veRL's
    # compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float}
    reward_fn: Annotated[str, AfterValidator(_import_path)] | None = None
    reward_timeout_s: Positive = 10.0  # per sample: a reward still running then is stopped and marks its sample
    reward_workers: AtLeast1 = 2  # processes per rollout engine that score rewards (a crash there spares the engine)
    # name: env -- multi-turn episodes (docs/agents.md). The environment, as "kind:name"
    # (rollout.envs.registry.ENVS lists the kinds), and the keyword arguments its maker takes
    env: Annotated[str, AfterValidator(_env_name)] | None = None
    env_args: dict[str, Any] = field(default_factory=dict)
    # tools the model may call: "calculator", "python" (sandboxed), "mcp:<server command>"
    tools: Annotated[list[NonEmpty], AfterValidator(_tools)] = field(default_factory=list)
    max_turns: AtLeast1 = 4  # model turns per episode; the episode then ends with what it has earned
    step_timeout_s: Positive = 30.0  # one environment call (reset, step, a tool); past it the episode fails
    episode_timeout_s: Positive = 600.0  # a whole episode, generation included; past it the episode fails

    def __post_init__(self) -> None:
        if self.name == "math" and not self.path:
            raise ConfigError("the math task needs task.path: a .jsonl or .parquet file with prompt and answer")
        if self.name == "env" and not self.env:
            raise ConfigError("task.name env needs task.env: the environment, e.g. reasoning_gym:products")
        if self.env and self.name != "env":
            raise ConfigError(f"task.env is set but task.name is {self.name!r}: set task.name: env to train on it")
        if self.tools and self.name != "env":
            raise ConfigError("task.tools needs task.name: env (tools are called inside multi-turn episodes)")
