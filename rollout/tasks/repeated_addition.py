"""Multiplication written out as repeated addition: the long-answer task a CPU can afford.

The prompt is a one-digit number and a count ("7x13:"); the answer adds the number that many
times, each step writing the number, how many additions are left and the running total with
its carries, three digits wide ("7,13=007 7,12=014 ... 7,01=091"); the last total is the
answer. Each step is 9 tokens, so with counts of 3 to 20 a response is about 27 to 180 tokens
long and its length follows the count: short problems are mostly
right, long ones mostly wrong, and the model has to keep a long chain right to earn the
reward. That is where sequence-level importance weights become extreme and length-normalised
weights hide it, which one-digit answers cannot show.

The format is chosen so that a 2-layer model can learn it: every step has the same token
layout (fixed widths), each step depends only on the one before it (the first on the
prompt), and the count-down says when to stop. The reward scores the
final total only, as a math verifier scores a final answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MIN_COUNT, MAX_COUNT = 3, 20
_FINAL = re.compile(r"=(\d+)\s*$")
_STEP = re.compile(r"\d,\d\d=\d{3}")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "7x13:"
    answer: str  # "91"
    working: str  # "7,13=007 7,12=014 ... 7,01=091": the solution the tiny model's warm-up learns


def problem(number: int, count: int) -> Problem:
    if not 1 <= number <= 9 or not MIN_COUNT <= count <= MAX_COUNT:
        raise ValueError(f"repeated addition takes a number 1-9 and a count {MIN_COUNT}-{MAX_COUNT}, "
                         f"got {number} x {count}")  # fmt: skip
    working = " ".join(f"{number},{count - i:02d}={number * (i + 1):03d}" for i in range(count))
    return Problem(f"{number}x{count:02d}:", str(number * count), working)


def problems(count: int, seed: int = 0, min_count: int = MIN_COUNT, max_count: int = MAX_COUNT) -> list[Problem]:
    """`count` problems, reproducible from `seed`: the number uniform in 2-9, the count uniform
    in [min_count, max_count], so response lengths spread evenly over 9 x that range tokens."""
    if not MIN_COUNT <= min_count <= max_count <= MAX_COUNT:
        raise ValueError(f"counts must satisfy {MIN_COUNT} <= min_count <= max_count <= {MAX_COUNT}")
    rng = random.Random(seed)
    return [problem(rng.randint(2, 9), rng.randint(min_count, max_count)) for _ in range(count)]


def corpus(count: int, seed: int = 0) -> list[str]:
    """Solved problems as text: what the tiny model's tokenizer and warm-up are trained on."""
    return [p.prompt + p.working for p in problems(count, seed)]


def final_answer(response: str) -> str | None:
    """The last step's total as a plain number ("091" -> "91"); None unless the response ends
    in a step."""
    found = _FINAL.search(response)
    return str(int(found.group(1))) if found else None


def reward(response: str, answer: str) -> float:
    """1.0 if the response ends with the right total, else 0.0."""
    return 1.0 if final_answer(response) == answer else 0.0


def steps(response: str) -> int:
    """How many well-formed steps a response holds (for diagnostics)."""
    return len(_STEP.findall(response))
