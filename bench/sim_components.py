"""Simulated engines and learner behind vespo.orchestration.contracts, and the real buffer behind a counter.

Like the in-process fakes of the unit tests, but with time: an engine is a continuous-batching
decoder whose sequences all advance at the per-sequence rate its batch size allows (the cost
model's curve), so one number (tokens decoded per sequence so far) says where every running
sequence is, and the next finish is the top of a heap. Nothing ticks: an engine is brought to
the present when it is handed prompts or weights, and by the event thread at its next finish,
the only moments its batch size changes. A weight broadcast pauses it; tokens decoded after it
carry the new version, those before keep theirs (partial rollout, as the vLLM engine tags
them). Each whole group goes into the real ReplayBuffer, as the engine actor pushes it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bench.sim_model import CostModel
from bench.sim_world import Ledger, SimPending, World, remote
from buffer.replay import Batch, ReplayBuffer
from buffer.trajectory import Trajectory
from learner.step_result import StepResult
from rollout.records import PromptItem
from vespo.orchestration.contracts import Done

_CAP = 1 << 15  # longest response or prompt an engine hands out (tokens)
_ZEROS = np.zeros(_CAP, np.int32)  # every response's token ids and prompt: views, no copies
_LOGPROBS = np.full(_CAP, -0.5, np.float32)


@dataclass
class EngineStats:
    tokens: int = 0
    generate_s: float = 0.0


@dataclass
class _Group:
    item: PromptItem
    lengths: np.ndarray
    rewards: np.ndarray
    left: int
    done: list = field(default_factory=list)  # (index, token versions, first version, last version)


class SimEngine:
    def __init__(self, name: str, world: World, model: CostModel, buffer: ReplayBuffer, ledger: Ledger, n: int):
        self.name, self.world, self.model, self.buffer, self.ledger, self.n = name, world, model, buffer, ledger, n
        self.version, self.stamp = 0, 0
        self.decoded, self.t = 0.0, 0.0  # tokens each running sequence has advanced so far, at time t
        # heap of (decoded at its finish, order, group, index, decoded at its start, its first version,
        # how many weight changes came before it started)
        self.running: list = []
        self.waiting: deque = deque()  # sequences beyond the KV-cache limit, started in order
        self.groups: dict[str, _Group] = {}  # in flight
        self.marks: list[tuple[float, int]] = []  # (decoded, version) at each weight change
        self.paused, self.resume_at, self.next_version = False, None, 0
        self.order = itertools.count()
        self.stats_ = EngineStats()
        self.busy_since: float | None = None
        self.groups_pushed, self.put_cpu_s = 0, 0.0
        self.version_cache: dict[int, np.ndarray] = {}

    # -- the contract --------------------------------------------------------------------------

    @remote("engine.start")
    def start(self) -> Done:
        return Done({"engine_id": self.name, "backend": "sim", "startup_s": 0.0, "receivers": 1})

    @remote("engine.poll")
    def poll(self) -> tuple[int, list]:
        """Groups in flight. No need to advance first: the clock never passes an event the event
        thread has not handled, so every group due by now is in the buffer already."""
        return len(self.groups), []

    @remote("engine.submit")
    def submit(self, items: list[PromptItem]) -> None:
        with self.world.lock:
            self.advance(self.world.now())
            for item in items:
                lengths, rewards = self.model.group_lengths(item.group_id, self.n)
                group = _Group(item, lengths, rewards, self.n)
                self.groups[item.group_id] = group
                self.waiting.extend((group, i) for i in range(self.n))
            self._admit()
            self._schedule()

    @remote("engine.receive_weights")
    def receive_weights(self, plan: list, version: int) -> SimPending:
        """Pause now; resume with `version` when the learner's broadcast ends."""
        with self.world.lock:
            self.advance(self.world.now())
            self.paused, self.resume_at, self.next_version = True, None, version
            self._busy(False)
            broadcast = self.world.broadcast
            broadcast.engines.append(self)
            return SimPending(self.world, broadcast.ready, broadcast.end, {"version": version})

    @remote("engine.join_weight_group")
    def join_weight_group(self, host: str, port: int, offset: int, world: int, backend: str, secret: str) -> Done:
        return Done()

    @remote("engine.stats")
    def stats(self) -> EngineStats:
        return self.stats_

    @remote("engine.set_buffer")
    def set_buffer(self, buffer) -> None:
        self.buffer = buffer

    @remote("engine.generate")
    def generate(self, items: list[PromptItem], n: int | None = None):
        raise NotImplementedError("the simulation runs without evaluation (train.eval_every=0)")

    @remote("engine.restart")
    def restart(self, timeout_s: float) -> dict:
        raise NotImplementedError("simulated engines do not fail")

    def drain(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    # -- decoding ------------------------------------------------------------------------------

    def advance(self, t: float) -> None:
        """Bring every running sequence to time t, finishing those whose last token comes first
        (each finish changes the batch size, so the rate, of those left)."""
        t = max(t, self.t)
        while True:
            if self.paused:
                if self.resume_at is not None and self.resume_at <= t:
                    self.t = self.resume_at
                    self._resume()
                    continue
                break
            if not self.running:
                break
            rate = self.model.seq_tokens_s(len(self.running))
            top = self.running[0][0]
            finish = self.t + (top - self.decoded) / rate
            if finish > t:
                self.decoded += (t - self.t) * rate
                break
            self.decoded, self.t = top, finish
            self._finish(heapq.heappop(self.running))
            self._admit()
        self.t = t
        self._schedule()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.model.max_seqs:
            group, i = self.waiting.popleft()
            first = self.next_version if self.paused else self.version  # its first token comes after the swap
            heapq.heappush(self.running, (self.decoded + int(group.lengths[i]), next(self.order), group, i,
                                          self.decoded, first, len(self.marks)))  # fmt: skip
        self._busy(bool(self.running) and not self.paused)

    def _busy(self, busy: bool) -> None:
        if busy and self.busy_since is None:
            self.busy_since = self.t
        elif not busy and self.busy_since is not None:
            self.stats_.generate_s += self.t - self.busy_since
            self.busy_since = None

    def _schedule(self) -> None:
        self.stamp += 1
        if self.paused:
            if self.resume_at is not None:
                self.world.schedule(self.resume_at, self)
        elif self.running:
            rate = self.model.seq_tokens_s(len(self.running))
            self.world.schedule(self.t + (self.running[0][0] - self.decoded) / rate, self)

    def _resume(self) -> None:
        self.paused, self.resume_at = False, None
        self.version = self.next_version
        self.marks.append((self.decoded, self.version))
        self._busy(bool(self.running))

    def _finish(self, seq) -> None:
        end, _, group, i, start, first, marks_before = seq
        length = int(group.lengths[i])
        versions, first, last = self._versions(start, end, length, first, marks_before)
        self.stats_.tokens += length
        group.done.append((i, versions, first, last))
        group.left -= 1
        if not group.left:
            self._push(group)

    def _versions(
        self, start: float, end: float, length: int, first: int, marks_before: int
    ) -> tuple[np.ndarray, int, int]:
        """Each token's weights version: `first`, then each weight change since the sequence started."""
        hi = bisect.bisect_left(self.marks, (end, -1), lo=marks_before)
        if marks_before >= hi:
            if first not in self.version_cache:
                self.version_cache[first] = np.full(_CAP, first, np.int32)
            return self.version_cache[first][:length], first, first
        out = np.full(length, first, np.int32)
        for decoded, version in self.marks[marks_before:hi]:
            out[min(length, max(0, round(decoded - start))) :] = version
        return out, int(out[0]), int(out[-1])

    def _push(self, group: _Group) -> None:
        item, p = group.item, self.model.prompt_tokens
        trajs = [Trajectory(traj_id=f"{item.group_id}/{i}", group_id=item.group_id, group_size=self.n,
                            prompt_ids=_ZEROS[:p], response_ids=_ZEROS[: len(versions)],
                            behavior_logprobs=_LOGPROBS[: len(versions)], token_versions=versions,
                            version_start=first, version_end=last, reward=float(group.rewards[i]),
                            finish_reason="length" if len(versions) >= self.model.max_response else "stop",
                            engine_id=self.name, extra={"sample_id": item.sample_id})
                 for i, versions, first, last in sorted(group.done, key=lambda d: d[0])]  # fmt: skip
        del self.groups[item.group_id]
        started = time.thread_time()
        self.buffer.put_many(trajs)  # room is sized for the run: a full buffer is an error, not a wait
        self.put_cpu_s += time.thread_time() - started
        self.groups_pushed += 1
        self.world.group_arrived()


class Broadcast:
    """One weight broadcast: the engines that joined it, and when it ends."""

    def __init__(self):
        self.engines: list[SimEngine] = []
        self.ready = threading.Event()
        self.end = [0.0]


@dataclass
class TrainRecord:
    start: float
    end: float
    tokens: int
    staleness: list[int]  # per trajectory
    version: int


class SimLearner:
    """`ranks` data-parallel learner ranks: a step costs its tokens at the cost model's rate, after
    the padded batch the learner group's driver builds in the controller's process."""

    def __init__(self, world: World, model: CostModel, ranks: int, ledger: Ledger):
        self.world, self.model, self.ranks, self.ledger = world, model, ranks, ledger
        self.records: list[TrainRecord] = []
        self.broadcasts: list[tuple[float, float]] = []
        self.driver_s = 0.0  # simulated seconds the controller's process spent building padded batches
        world.broadcast = Broadcast()

    @remote("learner.train")
    def train(self, batch: Batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult:
        tokens = sum(t.num_tokens for t in batch.trajectories)
        width = max((t.num_tokens for t in batch.trajectories), default=0)
        self.world.pay()  # the step starts once the controller has done its part
        start, driver = self.world.now(), self.model.driver_s(len(batch.trajectories), width)
        self.driver_s += driver
        self.world.sleep_until(start + driver + self.model.train_s(tokens, self.ranks))
        self.records.append(TrainRecord(start, self.world.now(), tokens, list(batch.staleness), batch.version))
        drift = {lag: self.model.batch_kl(lag, batch.version) for lag in sorted(set(batch.staleness))}
        return StepResult({"actor/loss": 0.0}, kl_by_lag=drift)

    @remote("learner.open_weight_sync")
    def open_weight_sync(self, num_receivers: int, bucket_bytes: int) -> tuple[str, int, str]:
        return "127.0.0.1", 0, "00"

    @remote("learner.connect_weight_sync")
    def connect_weight_sync(self) -> Done:
        return Done()

    @remote("learner.weight_plan")
    def weight_plan(self) -> list:
        return []

    @remote("learner.broadcast_weights")
    def broadcast_weights(self, plan: list) -> SimPending:
        """Starts when every engine has joined (WeightPublisher asks them first); ends broadcast_s later."""
        world = self.world
        with world.lock:
            broadcast, world.broadcast = world.broadcast, Broadcast()
            start = world.now()
            broadcast.end[0] = start + self.model.broadcast_s
            for engine in broadcast.engines:
                engine.resume_at = broadcast.end[0]
                engine._schedule()
            broadcast.ready.set()
        self.broadcasts.append((start, broadcast.end[0]))
        return SimPending(world, broadcast.ready, broadcast.end)

    @remote("learner.refused")
    def refused(self) -> tuple[int, list[str]]:
        return 0, []

    def save_checkpoint(self, *args, **kwargs):
        raise NotImplementedError("the simulation runs without checkpoints")

    def load_checkpoint(self, path):
        raise NotImplementedError("the simulation runs without checkpoints")

    def rebuild(self, cfg) -> None:
        pass

    def shutdown(self) -> None:
        pass


class CountedBuffer:
    """The real ReplayBuffer, each call counted; waits are in simulated seconds."""

    def __init__(self, buffer: ReplayBuffer, world: World, ledger: Ledger):
        self.buffer, self.world, self.ledger = buffer, world, ledger
        self.refused = 0  # admit calls that got fewer groups than they asked for
        self.caps: list[tuple[float, int | None]] = []  # (simulated time, cap) at each change

    @remote("buffer.set_staleness_cap")
    def set_staleness_cap(self, cap: int | None) -> None:
        self.buffer.set_staleness_cap(cap)
        self.caps.append((self.world.now(), cap))

    @remote("buffer.admit")
    def admit(self, current_version: int, wanted: int) -> int:
        admitted = self.buffer.admit(current_version, wanted)
        self.refused += admitted < wanted
        return admitted

    @remote("buffer.abandon")
    def abandon(self, n_groups: int) -> None:
        self.buffer.abandon(n_groups)

    @remote("buffer.get_batch")
    def get_batch(self, n_groups: int, current_version: int, timeout: float | None = 0.0,
                  at_least: int | None = None) -> Batch | None:  # fmt: skip
        """The real buffer's own wait, on the simulated clock: look, and look again each time a
        group arrives, until there is a batch or the timeout passes."""
        world = self.world
        deadline = math.inf if timeout is None else world.now() + timeout
        while True:
            batch = self.buffer.get_batch(n_groups, current_version, 0.0, at_least)
            if batch is not None or world.now() >= deadline:
                return batch
            world.wait_for_put(deadline)

    @remote("buffer.seen_groups")
    def seen_groups(self, group_ids: list[str]) -> list[str]:
        return self.buffer.seen_groups(group_ids)

    @remote("buffer.snapshot_seen_groups")
    def snapshot_seen_groups(self, directory) -> list[str]:
        return self.buffer.snapshot_seen_groups(directory)

    @remote("buffer.metrics")
    def metrics(self) -> dict[str, float]:
        return self.buffer.metrics()

    def shutdown(self) -> None:
        pass
