"""`task.env: reasoning_gym:<dataset>`: reasoning-gym's procedural generators as episodes.

Each item is a question with a verifier (`score_answer`). The model may call tools over as
many turns as `task.max_turns` allows; its first turn without a tool call is its answer (the
text inside `<answer>...</answer>` if it writes one), scored by the dataset's own verifier,
and the episode ends. `task.env_args` go to the dataset's config (e.g. `min_digits`). reasoning-gym seeds item i
with seed + i, so the held-out items start at seed + train_size, right after the last
training item, never among them (seeds seed and seed + 1 would share all but one item);
both splits are rebuilt identically in every process from the config.
`task.reward_fn` replaces the dataset's verifier: some pay partial credit that a policy learns
to collect (`products` pays len(answer)/len(response) for any response containing the answer).
"""

from __future__ import annotations

import difflib
from typing import Any

from rollout.envs.base import EnvStep
from rollout.tasks.base import TaskConfig, TaskSample
from rollout.tasks.registry import user_reward


class ReasoningGymEnvs:
    def __init__(self, name: str, cfg: TaskConfig):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            close = difflib.get_close_matches(name, list(DATASETS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"task.env: reasoning-gym has no dataset {name!r}{hint}")
        self.name = f"reasoning_gym:{name}"
        self.reward = user_reward(cfg.reward_fn) if cfg.reward_fn else None
        try:
            self.splits = {
                "train": reasoning_gym.create_dataset(name, seed=cfg.seed, size=cfg.train_size, **cfg.env_args),
                "eval": reasoning_gym.create_dataset(
                    name, seed=cfg.seed + cfg.train_size, size=cfg.eval_size, **cfg.env_args
                ),
            }
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"task.env_args do not fit reasoning-gym's {name!r}: {err}") from err

    def _split(self, split: str):
        return self.splits["train" if split == "train" else "eval"]

    def samples(self, split: str) -> list[TaskSample]:
        dataset = self._split(split)
        return [
            TaskSample(f"{split}-{i}", entry["question"], str(entry["answer"]), chat=False,
                       extra_info={"split": split, "index": i})
            for i, entry in enumerate(dataset)
        ]  # fmt: skip

    def make(self) -> ReasoningGymEnv:
        return ReasoningGymEnv(self)


class ReasoningGymEnv:
    def __init__(self, envs: ReasoningGymEnvs):
        self.envs = envs
        self.dataset = None
        self.entry: dict[str, Any] | None = None
        self.sample: TaskSample | None = None

    async def reset(self, sample: TaskSample) -> list[dict[str, Any]]:
        info = sample.extra_info or {}
        self.dataset = self.envs._split(str(info.get("split", "train")))
        self.entry = self.dataset[int(info["index"])]
        self.sample = sample
        return [{"role": "user", "content": self.entry["question"]}]

    async def step(self, turn: str) -> EnvStep:
        from reasoning_gym.utils import extract_answer

        answer = extract_answer(turn) or turn.strip()
        if self.envs.reward is not None:
            return EnvStep(reward=float(self.envs.reward(answer, self.sample)), done=True)
        return EnvStep(reward=float(self.dataset.score_answer(answer, self.entry)), done=True)

    async def close(self) -> None:
        pass
