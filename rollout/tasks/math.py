"""Math word problems from JSONL or Parquet rows, scored by math-verify.

The rows may be veRL's Parquet (DAPO-Math-17k), OpenAI-style chat JSONL or plain prompt/answer
rows: `rollout.tasks.datasets` reads them all and checks every row when the file is read.

math-verify parses the reference answer and the response (LaTeX, boxed answers, plain numbers)
and compares them symbolically, so "\\frac{1}{2}" and "0.5" agree. On its own it already takes
a response's `\\boxed{}` or "the answer is x" phrase, and otherwise its last number ("3 apples
plus 4 is 7" gives 7). It does not know GSM8K's `#### x` or DAPO's `Answer: x` lines, so those
markers are found here first: the final answer is the last explicit marker in the response.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rollout.tasks.base import TaskConfig, TaskSample
from rollout.tasks.datasets import load_samples

# GSM8K's final line, "#### 1,234": only a number counts, so a markdown heading such as
# "#### Step 1: add" or "#### 1. Set up" is not taken for an answer
GSM8K_ANSWER = re.compile(r"####[ \t]*\$?[ \t]*(-?[\d,]*\d(?:\.\d+)?)[ \t]*\.?[ \t]*$", re.MULTILINE)
# DAPO's "Answer: x" as a line of its own, markdown emphasis allowed ("**Final Answer:** x")
ANSWER_LINE = re.compile(r"^[ \t>#*_-]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(\S.*?)[ \t*_]*$", re.MULTILINE | re.I)
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class MathTask:
    name = "math"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        samples = load_samples(Path(cfg.path), cfg.prompt_key, cfg.answer_key)
        n_eval = int(len(samples) * cfg.eval_fraction)
        self._splits = {"train": samples[: len(samples) - n_eval], "eval": samples[len(samples) - n_eval :]}

    def samples(self, split: str) -> list[TaskSample]:
        return self._splits[split]


def math_reward(response: str, sample: TaskSample) -> float:
    """1.0 when math-verify finds the response's final answer equal to the reference answer.
    Its own timeouts use signal.alarm, which works only in a main thread: they are off, and the
    reward worker pool enforces task.reward_timeout_s instead."""
    from math_verify import verify

    _quiet_timeout_notice()
    gold = reference_answer(sample.answer)
    if not gold:
        return 0.0
    return 1.0 if verify(gold, response_answer(response), timeout_seconds=None) else 0.0


def _quiet_timeout_notice() -> None:
    """math-verify warns once per process that its timeout is off and the caller must enforce
    one. The reward pool does, so the notice would only tell users something false."""
    for name in ("math_verify.grader", "math_verify.parser"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TimeoutNotice) for f in logger.filters):
            logger.addFilter(_TimeoutNotice())


class _TimeoutNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def reference_answer(answer: str) -> list:
    """The parsed reference: GSM8K's text after the last `####` (thousands separators dropped),
    else a worked solution's last `\\boxed{}` (MATH), else the whole text read as LaTeX."""
    if "####" in answer:
        answer = THOUSANDS.sub("", answer.rsplit("####", 1)[1].strip())
    boxed = answer.rfind("\\boxed")
    if boxed >= 0:
        return _parse(answer[boxed:])
    if "$" in answer:
        return _parse(answer)
    return _parse(f"${answer}$") or _parse(answer)


def response_answer(response: str) -> list:
    """The parsed final answer of a response: that of its last explicit marker, else whatever
    math-verify takes from the whole response."""
    span = final_answer_span(response)
    found = (_parse(span) or _parse_latex(span)) if span is not None else []
    return found or _parse(response)


def final_answer_span(response: str) -> str | None:
    """The text of the last explicit final-answer marker in the response, or None: a `\\boxed{}`
    (from it on; math-verify reads the box), a GSM8K `#### n` number or an `Answer: x` line."""
    found: list[tuple[int, str]] = []
    boxed = response.rfind("\\boxed")
    if boxed >= 0:
        found.append((boxed, response[boxed:]))
    for pattern, clean in ((GSM8K_ANSWER, lambda s: THOUSANDS.sub("", s)), (ANSWER_LINE, str)):
        matches = list(pattern.finditer(response))
        if matches:
            found.append((matches[-1].start(), clean(matches[-1].group(1))))
    return max(found)[1] if found else None


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _parse_latex(text: str) -> list:
    """`\\sqrt{2}` outside `$...$` is not read as LaTeX by math-verify; inside it is."""
    return _parse(f"${text}$") if "$" not in text else []
