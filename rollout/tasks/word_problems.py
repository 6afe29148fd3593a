"""Easy grade-school word problems, generated here from a seed, as veRL-style Parquet rows.

One or two operations on small numbers ("Tom has 3 apples and buys 5 more. How many apples
does he have now?"), over several templates, names and objects: easy enough that a 135M
instruct model answers some of them right out of the box (so rewards are neither all 0 nor
all 1 and RL has a signal), and exact to check. Nothing is downloaded; the same seed gives
the same rows on every machine.

Rows follow veRL's schema: `data_source`, `prompt` (a list of chat messages), `ability`,
`reward_model` = {"ground_truth", "style"} and `extra_info` = {"index", "split", ...}.
Run: vespo word-problems OUT.parquet --rows 2000 --seed 0
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_SOURCE = "vespo/word_problems"
INSTRUCTION = "Give the final answer as a number after '####'."

# (name, pronoun)
NAMES = [
    ("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Mia", "she"),
    ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ella", "she"),
]  # fmt: skip
# (singular, plural)
OBJECTS = [
    ("apple", "apples"), ("pen", "pens"), ("book", "books"), ("cookie", "cookies"), ("marble", "marbles"),
    ("sticker", "stickers"), ("orange", "oranges"), ("card", "cards"), ("toy car", "toy cars"),
    ("candy", "candies"), ("shell", "shells"), ("balloon", "balloons"), ("egg", "eggs"), ("flower", "flowers"),
]  # fmt: skip
CONTAINERS = ["box", "bag", "basket", "jar", "pack"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    template: str  # which template made it (for stats and tests)
    operands: tuple[int, ...]


def _pick_two_names(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def _add_buy(rng: random.Random) -> Problem:
    (name, pron), (_, objs) = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = f"{name} has {a} {objs} and buys {b} more. How many {objs} does {pron} have now?"
    return Problem(q, a + b, "add_buy", (a, b))


def _add_together(rng: random.Random) -> Problem:
    (n1, _), (n2, _) = _pick_two_names(rng)
    objs = rng.choice(OBJECTS)[1]
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    q = f"{n1} has {a} {objs}. {n2} has {b} {objs}. How many {objs} do they have together?"
    return Problem(q, a + b, "add_together", (a, b))


def _sub_give(rng: random.Random) -> Problem:
    (n1, pron), (n2, _) = _pick_two_names(rng)
    objs = rng.choice(OBJECTS)[1]
    a = rng.randint(5, 20)
    b = rng.randint(1, a - 1)
    q = f"{n1} has {a} {objs} and gives {b} of them to {n2}. How many {objs} does {pron} have left?"
    return Problem(q, a - b, "sub_give", (a, b))


def _sub_eat(rng: random.Random) -> Problem:
    name, _ = rng.choice(NAMES)
    objs = rng.choice(OBJECTS)[1]
    box = rng.choice(CONTAINERS)
    a = rng.randint(5, 20)
    b = rng.randint(1, a - 1)
    q = f"There are {a} {objs} in a {box}. {name} takes {b} of them out. How many {objs} are still in the {box}?"
    return Problem(q, a - b, "sub_take", (a, b))


def _mul_boxes(rng: random.Random) -> Problem:
    objs = rng.choice(OBJECTS)[1]
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 6)
    plural = box + ("es" if box.endswith("x") else "s")
    q = f"Each {box} holds {a} {objs}. How many {objs} are in {b} {plural}?"
    return Problem(q, a * b, "mul_boxes", (a, b))


def _div_share(rng: random.Random) -> Problem:
    name, _ = rng.choice(NAMES)
    objs = rng.choice(OBJECTS)[1]
    each, friends = rng.randint(2, 6), rng.randint(2, 5)
    total = each * friends
    q = f"{name} shares {total} {objs} equally among {friends} friends. How many {objs} does each friend get?"
    return Problem(q, each, "div_share", (total, friends))


def _add_then_sub(rng: random.Random) -> Problem:
    (name, pron), objs = rng.choice(NAMES), rng.choice(OBJECTS)[1]
    a, b = rng.randint(2, 10), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    q = f"{name} has {a} {objs}. {pron.capitalize()} buys {b} more and then gives away {c}. How many {objs} does {pron} have now?"  # noqa: E501
    return Problem(q, a + b - c, "add_then_sub", (a, b, c))


def _mul_then_add(rng: random.Random) -> Problem:
    (name, pron), objs = rng.choice(NAMES), rng.choice(OBJECTS)[1]
    box = rng.choice(CONTAINERS)
    plural = box + ("es" if box.endswith("x") else "s")
    a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
    q = f"{name} buys {a} {plural} with {b} {objs} in each {box}. {pron.capitalize()} already had {c} {objs}. How many {objs} does {pron} have now?"  # noqa: E501
    return Problem(q, a * b + c, "mul_then_add", (a, b, c))


# Easy templates more often than two-step ones, so the base rate lands in a useful range.
TEMPLATES: list[tuple[Callable[[random.Random], Problem], int]] = [
    (_add_buy, 3), (_add_together, 3), (_sub_give, 2), (_sub_eat, 2),
    (_mul_boxes, 2), (_div_share, 1), (_add_then_sub, 1), (_mul_then_add, 1),
]  # fmt: skip


def problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` problems, reproducible from `seed`."""
    rng = random.Random(seed)
    makers = [m for m, _ in TEMPLATES]
    weights = [w for _, w in TEMPLATES]
    return [rng.choices(makers, weights)[0](rng) for _ in range(count)]


def messages(problem: Problem, system: str | None = None) -> list[dict[str, str]]:
    """The chat turns of one problem: an optional system turn, then the user's question."""
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"})
    return turns


def rows(count: int, seed: int = 0, split: str = "train", system: str | None = None) -> list[dict]:
    """veRL-schema rows of `count` problems."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": messages(p, system),
            "ability": "math",
            "reward_model": {"ground_truth": str(p.answer), "style": "rule"},
            "extra_info": {"index": i, "split": split, "question": p.question, "template": p.template},
        }
        for i, p in enumerate(problems(count, seed))
    ]


def schema():
    """Explicit Arrow types: structs for reward_model and extra_info, a list of structs for prompt."""
    import pyarrow as pa

    text = pa.string()
    message = pa.struct([("role", text), ("content", text)])
    extra = pa.struct([("index", pa.int64()), ("split", text), ("question", text), ("template", text)])
    return pa.schema(
        [
            ("data_source", text),
            ("prompt", pa.list_(message)),
            ("ability", text),
            ("reward_model", pa.struct([("ground_truth", text), ("style", text)])),
            ("extra_info", extra),
        ]
    )


def write_parquet(path: str | Path, count: int, seed: int = 0, split: str = "train", system: str | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(count, seed, split, system), schema=schema()), path)
    return path


_AFTER_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\d(?:\.\d+)?)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(response: str) -> str | None:
    """The number after the first '####', else the last number in the response."""
    found = _AFTER_HASHES.search(response)
    if found is None:
        numbers = _NUMBER.findall(response)
        if not numbers:
            return None
        text = numbers[-1]
    else:
        text = found.group(1)
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def reward(response: str, ground_truth: str) -> float:
    """1.0 when the extracted answer equals the ground truth, else 0.0."""
    return 1.0 if extract_answer(response) == ground_truth else 0.0
