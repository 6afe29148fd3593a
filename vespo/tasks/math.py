"""Math word problems from JSONL or Parquet rows, scored by math-verify.

math-verify parses both the reference answer and the response (LaTeX, boxed answers, plain
numbers) and compares them symbolically, so "\\frac{1}{2}" and "0.5" agree. Rows are checked
when the file is read: a missing field or non-text value is an error naming the row.
"""

from __future__ import annotations

import json
from pathlib import Path

from vespo.tasks.registry import TaskConfig, TaskSample


class MathTask:
    name = "math"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        rows = read_rows(Path(cfg.path))
        samples = [self._sample(i, row) for i, row in enumerate(rows)]
        n_eval = int(len(samples) * cfg.eval_fraction)
        self._splits = {"train": samples[: len(samples) - n_eval], "eval": samples[len(samples) - n_eval :]}

    def samples(self, split: str) -> list[TaskSample]:
        return self._splits[split]

    def _sample(self, index: int, row: dict) -> TaskSample:
        values = []
        for key in (self.cfg.prompt_key, self.cfg.answer_key):
            if key not in row:
                raise ValueError(f"{self.cfg.path}: row {index} has no {key!r} field (it has {sorted(row)})")
            value = row[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key == self.cfg.answer_key:
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{self.cfg.path}: row {index} field {key!r} must be non-empty text, got {value!r}")
            values.append(value)
        return TaskSample(str(row.get("id", index)), values[0], values[1])


def math_reward(response: str, sample: TaskSample) -> float:
    """1.0 when math-verify finds the reference answer in the response. Its own timeouts use
    signal.alarm, which works only in a main thread: they are off, and the reward worker pool
    enforces task.reward_timeout_s instead."""
    from math_verify import parse, verify

    answer = sample.answer
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", parsing_timeout=None)
    return 1.0 if gold and verify(gold, parse(response, parsing_timeout=None), timeout_seconds=None) else 0.0


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise ValueError(f"math task file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object: {err}") from err
        return rows
    raise ValueError(f"math task file {path} must be .jsonl or .parquet")
