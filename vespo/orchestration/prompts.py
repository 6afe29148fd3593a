"""The stream of prompts fed to the engines: shuffled epochs over a task's split, resumable.

Each prompt handed out becomes one group (its n samples); the group id names the epoch and
position, so it is unique for the run and the stream can resume exactly from a checkpoint.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from rollout.records import PromptItem
from rollout.tasks.registry import TaskSample, render_prompt


def prompt_item(group_id: str, sample: TaskSample, tokenizer, system_prompt: str | None = None) -> PromptItem:
    """What an engine is handed for one group: the rendered prompt, and what its reward needs."""
    text = render_prompt(sample, tokenizer, system_prompt)
    return PromptItem(group_id, text, answer=sample.answer, sample_id=sample.id, data_source=sample.data_source,
                      extra_info=sample.extra_info)  # fmt: skip


@dataclass
class PromptStreamState:
    epoch: int = 0
    position: int = 0


class PromptStream:
    def __init__(self, samples: list[TaskSample], seed: int = 0, state: PromptStreamState | None = None):
        if not samples:
            raise ValueError("the task has no training prompts")
        self.samples, self.seed = samples, seed
        self.by_id = {s.id: s for s in samples}
        self.state = state or PromptStreamState()
        self._order = self._shuffled(self.state.epoch)
        self.requeued: list[tuple[str, TaskSample]] = []  # handed out, never received: hand out again
        self._lock = threading.Lock()  # the feeder thread takes while the loop may requeue

    def requeue(self, items: list[tuple[str, TaskSample]]) -> None:
        """Prompts to hand out again, first and under their old group ids (after a resume, or
        from an engine that died holding them)."""
        with self._lock:
            self.requeued = list(items) + self.requeued

    def next(self) -> tuple[str, TaskSample]:
        """(group id, sample) of the next prompt."""
        with self._lock:
            return self._next()

    def _next(self) -> tuple[str, TaskSample]:
        if self.requeued:
            return self.requeued.pop(0)
        if self.state.position >= len(self._order):
            self.state = PromptStreamState(self.state.epoch + 1, 0)
            self._order = self._shuffled(self.state.epoch)
        sample = self.samples[self._order[self.state.position]]
        gid = f"e{self.state.epoch}-p{self.state.position}-{sample.id}"
        self.state.position += 1
        return gid, sample

    def take(self, n: int) -> list[tuple[str, TaskSample]]:
        return [self.next() for _ in range(n)]

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order
