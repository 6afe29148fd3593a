"""Where the learner's batches come from: two schedules, one data path.

Both hand prompts to the engines through the fleet, under the buffer's admission rule; the
engines push whole groups into the buffer; a batch is what `buffer.get_batch` returns (whole
groups with their staleness and weights). They differ only in *when* prompts are handed out:

- AsyncSource: a feeder thread keeps every engine supplied all the time; weights are published
  every `train.sync_every` steps, and generation never stops for them.
- SyncSource: the paper's N (`train.staleness_ratio`): a round hands out N x groups_per_step
  prompts with the current weights, the learner makes N updates on them (the k-th on data k
  versions old), then the weights are published and the next round starts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from buffer.replay import Batch
from vespo.orchestration.contracts import EngineLost
from vespo.orchestration.fleet import EngineFleet
from vespo.orchestration.weight_publisher import WeightPublisher


class _Source:
    clock = "wait"  # which RunSummary clock the time spent in next() goes to

    def __init__(self, fleet: EngineFleet, weights: WeightPublisher, train_cfg, stopping: Callable[[], bool]):
        self.fleet, self.weights, self.cfg, self.stopping = fleet, weights, train_cfg, stopping
        self.seconds = 0.0

    def _wait(self, step: int, feed: Callable[[], bool] | None = None, poll_s: float = 1.0) -> Batch | None:
        """Wait for groups_per_step fresh whole groups, checking for a stop every `poll_s`
        (None: stopped). `feed` runs each turn and returns True once nothing more can arrive;
        then what is there is taken, possibly nothing (an empty batch: the round is over)."""
        started = waiting_since = time.perf_counter()
        try:
            while not self.stopping():
                if self.fleet.dead:
                    self.weights.recover()
                    waiting_since = time.perf_counter()  # recovery is not a stall
                exhausted = feed() if feed is not None else False
                at_least = 1 if exhausted else None
                batch = self.fleet.buffer.get_batch(self.cfg.groups_per_step, step, 0 if exhausted else poll_s,
                                                    at_least)  # fmt: skip
                self._check()
                if batch is not None or exhausted:
                    return batch if batch is not None else _EMPTY
                if time.perf_counter() - waiting_since > self.cfg.batch_timeout_s:
                    raise TimeoutError(
                        f"no batch of {self.cfg.groups_per_step} fresh groups in train.batch_timeout_s="
                        f"{self.cfg.batch_timeout_s}s"
                    )
            return None
        finally:
            self.seconds += time.perf_counter() - started

    def _check(self) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


_EMPTY = Batch([], [], [], -1)  # a sync round that ended with nothing left to train on


class AsyncSource(_Source):
    def __init__(self, fleet: EngineFleet, weights: WeightPublisher, train_cfg, stopping: Callable[[], bool]):
        super().__init__(fleet, weights, train_cfg, stopping)
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._feed, name="vespo-feeder", daemon=True)
        self._thread.start()

    def next(self, step: int) -> Batch | None:
        self._step = step  # the admission rule's learner version
        return self._wait(step)

    def publish_due(self, step: int) -> bool:
        return step % self.cfg.sync_every == 0

    def close(self) -> None:
        """Stop handing out prompts (before a final checkpoint records what is in flight)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _feed(self) -> None:
        try:
            while not self._stop.is_set():
                fed = self.fleet.feed(self._step, self.cfg.max_inflight_groups)
                # nothing to do, or prompts failing: do not spin; otherwise still leave the engines'
                # and the buffer's event loops (and, on one machine, their cores) a gap between rounds
                time.sleep(0.05 if not fed or self.fleet.last_failed else 0.01)
        except BaseException as err:  # noqa: BLE001 - surfaced by the learner loop
            self.error = err

    def _check(self) -> None:
        if isinstance(self.error, EngineLost):
            raise self.error
        if self.error is not None:
            raise RuntimeError("the prompt feeder failed") from self.error


class SyncSource(_Source):
    clock = "generate"

    def __init__(self, fleet: EngineFleet, weights: WeightPublisher, train_cfg, stopping: Callable[[], bool]):
        super().__init__(fleet, weights, train_cfg, stopping)
        self.ratio = train_cfg.staleness_ratio
        self._given = self.ratio  # batches of the current round handed to the learner
        self._budget = 0  # prompts of the current round not handed out yet

    def next(self, step: int) -> Batch | None:
        since, restarts = time.perf_counter(), self.fleet.restarts
        while True:
            if self._given >= self.ratio:  # a new round, generated with the weights of this step
                if self.weights.version != step:  # it ended short, or its last batch had nothing to train
                    self.weights.publish(step)
                self._given, self._budget = 0, self.ratio * self.cfg.groups_per_step
            batch = self._wait(step, lambda: self._feed(step), poll_s=0.2)
            if batch is None:
                return None
            if batch.trajectories:
                self._given += 1
                return batch
            self._given = self.ratio  # the round ended short (refused or dropped prompts): go on to the next
            if self.fleet.restarts != restarts:  # recovering an engine is not a stall
                since, restarts = time.perf_counter(), self.fleet.restarts
            elif time.perf_counter() - since > self.cfg.batch_timeout_s:
                raise TimeoutError(
                    f"no batch in train.batch_timeout_s={self.cfg.batch_timeout_s}s: every round ended without a "
                    f"group to train ({self.fleet.refused_prompts} prompt(s) refused, {self.fleet.dropped_groups} "
                    "group(s) dropped after failing)"
                )

    def publish_due(self, step: int) -> bool:
        return self._given >= self.ratio

    def _feed(self, step: int) -> bool:
        """Hand out what is left of the round, spread over the live engines; True when the round
        has nothing more to bring (all handed out, none in flight)."""
        if self._budget:
            self._budget -= self.fleet.feed(step, per_engine=math.inf, budget=self._budget)
        else:
            self.fleet.feed(step, per_engine=0)  # collect failures, count what is in flight
        return self._budget == 0 and self.fleet.in_flight == 0
