"""Digit addition ("12+7=" -> "19"): the toy task with a verifiable reward.

Small enough that a tiny model learns part of it in seconds on a CPU (so rewards are neither
all 0 nor all 1 and RL has a signal), and exact to check, so a reward is never a judgement.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "12+7="
    answer: str  # "19"


def problems(count: int, seed: int = 0, max_digits: int = 1) -> list[Problem]:
    """`count` random additions of numbers below 10**max_digits, reproducible from `seed`."""
    rng = random.Random(seed)
    high = 10**max_digits - 1
    out = []
    for _ in range(count):
        a, b = rng.randint(0, high), rng.randint(0, high)
        out.append(Problem(f"{a}+{b}=", str(a + b)))
    return out


def corpus(count: int, seed: int = 0, max_digits: int = 1) -> list[str]:
    """Solved problems as text ("12+7=19"): what the tokenizer and the warm-up are trained on."""
    return [p.prompt + p.answer for p in problems(count, seed, max_digits)]


def reward(response: str, answer: str) -> float:
    """1.0 if the first number in the response is the answer, else 0.0."""
    found = _NUMBER.search(response)
    return 1.0 if found is not None and found.group() == answer else 0.0
