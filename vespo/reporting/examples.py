"""What the model writes: a few sampled responses with their rewards, for people to read.

Reward curves say whether a number moves; only the text says why (a template the model does
not follow, answers cut at max_new_tokens, a reward that misreads a right answer).
"""

from __future__ import annotations

from dataclasses import dataclass

from buffer.trajectory import Trajectory

COLUMNS = ["step", "prompt", "response", "reward", "reward_error", "finish_reason"]


@dataclass
class Example:
    prompt: str
    response: str
    reward: float
    reward_error: str | None
    finish_reason: str


def examples(trajs: list[Trajectory], tokenizer, count: int) -> list[Example]:
    """The first `count` trajectories, decoded (special tokens kept in the prompt: the template
    is part of what the model saw; dropped from the response, as the reward saw it, except in
    a multi-turn episode, where they mark whose turn each part is: the whole conversation)."""
    return [
        Example(
            tokenizer.decode(t.prompt_ids, skip_special_tokens=False),
            tokenizer.decode(t.response_ids, skip_special_tokens="turns" not in t.extra),
            float(t.reward),
            t.extra.get("reward_error"),
            t.finish_reason,
        )
        for t in trajs[:count]
    ]


def one_line(example: Example, width: int = 160) -> str:
    """An example for the console: the prompt's end, the response, the reward."""
    prompt = _squash(example.prompt)
    response = _squash(example.response)
    prompt = prompt if len(prompt) <= width // 2 else "..." + prompt[-(width // 2) :]
    response = response if len(response) <= width else response[:width] + "..."
    reward = f"reward error: {example.reward_error}" if example.reward_error else f"reward {example.reward:g}"
    return f"{prompt!r} -> {response!r} ({reward}, {example.finish_reason})"


def rows(step: int, items: list[Example]) -> list[list]:
    return [[step, e.prompt, e.response, e.reward, e.reward_error or "", e.finish_reason] for e in items]


def _squash(text: str) -> str:
    return " ".join(text.split())
