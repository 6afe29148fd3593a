"""The staleness-tagged replay buffer between rollout engines and the learner.

Guarantees, each tested: a trajectory put here is, at every moment, either held, returned
exactly once in a batch, or dropped for staleness and counted; groups are returned whole and
oldest first; nothing returned is staler than the cap under the drop policy; a full buffer
makes producers wait or raises BufferFull, it never discards data; a snapshot restores the
exact state. The cap is max_staleness, or a tighter one the controller sets from the measured
divergence of old data (set_staleness_cap, buffer.divergence). Thread-safe: one lock and one
condition, so the same object serves many producer threads or a threaded Ray actor (buffer.actor).
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from buffer.config import BufferConfig
from buffer.staleness import downweight, group_staleness, may_start
from buffer.trajectory import Trajectory

SNAPSHOT_FILE = "buffer.msgpack"


class BufferFull(RuntimeError):
    """The buffer is at capacity and the producer's wait ran out; nothing was stored."""


@dataclass
class Batch:
    """Whole groups for one learner step, oldest first."""

    trajectories: list[Trajectory]
    weights: list[float]  # 1.0, or < 1 for down-weighted stale groups
    staleness: list[int]  # per trajectory, at the version the batch was taken for
    version: int

    @property
    def num_groups(self) -> int:
        return len({t.group_id for t in self.trajectories})


@dataclass
class _Counters:
    put: int = 0
    returned: int = 0
    dropped_stale: int = 0
    dropped_groups: int = 0
    started_groups: int = 0
    abandoned_groups: int = 0  # started, will never arrive (their engine died): free admission room
    put_wait_s: float = 0.0
    get_wait_s: float = 0.0


@dataclass
class _State:
    incomplete: dict[str, list[Trajectory]] = field(default_factory=dict)
    ready: dict[str, list[Trajectory]] = field(default_factory=dict)
    # complete groups as (oldest token version, arrival, group id): the oldest (and stalest) on top
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    oldest: dict[str, int] = field(default_factory=dict)  # per held group, min token version so far
    arrivals: int = 0
    seen: set[str] = field(default_factory=set)  # every traj_id ever accepted
    seen_groups: set[str] = field(default_factory=set)  # and their groups: asked about every step
    dropped: set[str] = field(default_factory=set)  # group ids dropped while incomplete
    held: int = 0


class ReplayBuffer:
    def __init__(self, cfg: BufferConfig | None = None):
        self.cfg = cfg or BufferConfig()
        self._state = _State()
        self._counters = _Counters()
        self._last_staleness: list[int] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._incoming: dict[str, int] = {}  # traj_id -> puts now waiting for room with it
        self._dynamic_cap: int | None = None  # set_staleness_cap's; None: cfg.max_staleness alone

    # --- the staleness cap -------------------------------------------------------------------

    @property
    def staleness_cap(self) -> int:
        """The cap in force, in versions: max_staleness, or the tighter one set_staleness_cap gave
        (max_staleness stays the outer bound, whatever the divergence estimate says)."""
        dynamic = self._dynamic_cap
        return self.cfg.max_staleness if dynamic is None else min(self.cfg.max_staleness, dynamic)

    def set_staleness_cap(self, cap: int | None) -> None:
        """Cap staleness at `cap` versions within max_staleness (None: max_staleness again), for
        eviction, admission and down-weighting alike. Waiters are woken when it changes: a
        learner waiting for fresh groups re-checks them (dropping what the new cap makes stale),
        and producers waiting for room find the room that frees."""
        if cap is not None and cap < 0:
            raise ValueError(f"a staleness cap must be >= 0, got {cap}")
        with self._changed:
            before = self.staleness_cap
            self._dynamic_cap = cap
            if self.staleness_cap != before:
                self._changed.notify_all()

    # --- producers ------------------------------------------------------------------------------

    def put(self, trajectory: Trajectory, timeout: float | None = 0.0) -> None:
        self.put_many([trajectory], timeout)

    def put_many(self, trajectories: list[Trajectory], timeout: float | None = 0.0) -> None:
        """Store all or none: waits up to `timeout` seconds (None: forever) for room, then
        raises BufferFull. A traj_id seen before is refused (ValueError): no double counting."""
        with self._changed:
            ids = [t.traj_id for t in trajectories]
            if len(set(ids)) != len(ids) or self._state.seen.intersection(ids):
                dup = sorted(set(i for i in ids if ids.count(i) > 1) | self._state.seen.intersection(ids))
                raise ValueError(f"trajectories already in the buffer's history: {dup[:5]}")
            start = time.perf_counter()
            for i in ids:  # arrived, not yet stored: seen_groups counts them as delivered
                self._incoming[i] = self._incoming.get(i, 0) + 1
            try:
                room = self._changed.wait_for(
                    lambda: self._state.held + len(trajectories) <= self.cfg.capacity, timeout
                )
            finally:
                for i in ids:
                    self._incoming[i] -= 1
                    if not self._incoming[i]:
                        del self._incoming[i]
            self._counters.put_wait_s += time.perf_counter() - start
            if not room:
                raise BufferFull(
                    f"buffer holds {self._state.held} of {self.cfg.capacity} trajectories; "
                    f"{len(trajectories)} more do not fit (is the learner consuming?)"
                )
            for t in trajectories:
                self._add(t)
            self._changed.notify_all()

    def may_start(self, current_version: int, n_groups: int = 1) -> bool:
        """Admission: True (and the groups are counted as started) if generating n_groups more
        groups now keeps them within the staleness cap of the learner."""
        with self._lock:
            if self._admissible(current_version, n_groups) < n_groups:
                return False
            self._counters.started_groups += n_groups
            return True

    def admit(self, current_version: int, wanted: int) -> int:
        """Admission for up to `wanted` groups in one call (the feeder's, once per engine per
        round, instead of once per group): how many may start now, counted as started."""
        with self._lock:
            n = self._admissible(current_version, wanted)
            self._counters.started_groups += n
            return n

    def _admissible(self, current_version: int, wanted: int) -> int:
        """How many of `wanted` more groups the rule lets start now (caller holds the lock)."""
        c = self._counters
        live = c.started_groups - c.dropped_groups - c.abandoned_groups
        per_step, n = self.cfg.admission_groups_per_step, 0
        while n < wanted and may_start(live + n, current_version, self.staleness_cap, per_step):
            n += 1
        return n

    def abandon(self, n_groups: int) -> None:
        """n_groups that may_start admitted will never arrive (an engine died with them, or a
        resumed run hands them out again): without this, admission would count them as in
        flight for ever and, a few engine deaths later, refuse to start anything."""
        with self._lock:
            self._counters.abandoned_groups += n_groups

    # --- the learner --------------------------------------------------------------------------

    def get_batch(
        self, n_groups: int, current_version: int, timeout: float | None = 0.0, at_least: int | None = None
    ) -> Batch | None:
        """n_groups whole groups, oldest first, none staler than the cap (drop policy). Waits up to
        `timeout` seconds (None: forever) for enough fresh complete groups; None if they never come.
        `at_least`: take what is there once that many are (a sync round's short last batch)."""
        need = n_groups if at_least is None else min(at_least, n_groups)
        with self._changed:
            start = time.perf_counter()
            ok = self._changed.wait_for(lambda: self._fresh_ready(current_version) >= need, timeout)
            self._counters.get_wait_s += time.perf_counter() - start
            if not ok:
                return None
            return self._take(min(n_groups, len(self._state.ready)), current_version)

    def _fresh_ready(self, version: int) -> int:
        """Drops over-stale groups, complete or not (drop policy), and counts the usable ones.
        The heap keeps the stalest complete group on top, so this is cheap on every call."""
        st, cap = self._state, self.staleness_cap
        if self.cfg.stale_policy == "drop":
            while st.heap and version - st.heap[0][0] > cap:
                self._drop_ready(heapq.heappop(st.heap)[2])
            self._drop_stale_incomplete(version)
        return len(st.ready)

    def _take(self, n_groups: int, version: int) -> Batch:
        trajs, weights, stale = [], [], []
        for _ in range(n_groups):
            gid = heapq.heappop(self._state.heap)[2]
            group = self._state.ready.pop(gid)
            del self._state.oldest[gid]
            excess = group_staleness(group, version) - self.staleness_cap
            weight = downweight(excess, self.cfg.downweight_decay) if self.cfg.stale_policy == "downweight" else 1.0
            for t in group:
                trajs.append(t)
                weights.append(weight)
                stale.append(t.staleness(version))
        self._state.held -= len(trajs)
        self._counters.returned += len(trajs)
        self._last_staleness = stale
        self._changed.notify_all()
        return Batch(trajs, weights, stale, version)

    # --- bookkeeping --------------------------------------------------------------------------

    def _add(self, t: Trajectory) -> None:
        self._state.seen.add(t.traj_id)
        self._state.seen_groups.add(t.group_id)
        self._counters.put += 1
        if t.group_id in self._state.dropped:  # the rest of its group is gone: it cannot be trained on
            self._counters.dropped_stale += 1
            return
        st = self._state
        group = st.incomplete.setdefault(t.group_id, [])
        group.append(t)
        st.oldest[t.group_id] = min(st.oldest.get(t.group_id, t.oldest_version()), t.oldest_version())
        st.held += 1
        if len(group) >= t.group_size:
            self._complete(t.group_id, st.incomplete.pop(t.group_id))

    def _complete(self, gid: str, group: list[Trajectory]) -> None:
        st = self._state
        st.ready[gid] = group
        heapq.heappush(st.heap, (st.oldest[gid], st.arrivals, gid))
        st.arrivals += 1

    def _drop_ready(self, gid: str) -> None:
        group = self._state.ready.pop(gid)
        del self._state.oldest[gid]
        self._state.held -= len(group)
        self._counters.dropped_stale += len(group)
        self._counters.dropped_groups += 1
        self._changed.notify_all()

    def _drop_stale_incomplete(self, version: int) -> None:
        """Incomplete groups already over the cap can never be trained on: free their room now;
        their late members are dropped (and counted) on arrival."""
        st, cap = self._state, self.staleness_cap
        for gid in [g for g in st.incomplete if version - st.oldest[g] > cap]:
            group = st.incomplete.pop(gid)
            del st.oldest[gid]
            self._state.dropped.add(gid)
            self._state.held -= len(group)
            self._counters.dropped_stale += len(group)
            self._counters.dropped_groups += 1
            self._changed.notify_all()

    def held_ids(self) -> set[str]:
        with self._lock:
            groups = list(self._state.incomplete.values()) + list(self._state.ready.values())
            return {t.traj_id for g in groups for t in g}

    def metrics(self) -> dict[str, float]:
        with self._lock:
            c, s = self._counters, self._state
            out = {
                "buffer/occupancy": s.held / self.cfg.capacity,
                "buffer/held": float(s.held),
                "buffer/ready_groups": float(len(s.ready)),
                "buffer/incomplete_groups": float(len(s.incomplete)),
                "buffer/put_total": float(c.put),
                "buffer/returned_total": float(c.returned),
                "buffer/dropped_stale": float(c.dropped_stale),
                "buffer/dropped_groups": float(c.dropped_groups),
                "buffer/abandoned_groups": float(c.abandoned_groups),
                "buffer/put_wait_s": c.put_wait_s,
                "buffer/get_wait_s": c.get_wait_s,
                "buffer/staleness_cap": float(self.staleness_cap),
            }
            if self._last_staleness:
                st = np.asarray(self._last_staleness)
                out.update({"buffer/staleness_min": float(st.min()), "buffer/staleness_mean": float(st.mean())})
                out["buffer/staleness_max"] = float(st.max())
            return out

    def shutdown(self) -> None:
        """Nothing to release in-process (the actor's wrapper ends the actor)."""

    # --- snapshot -----------------------------------------------------------------------------

    def snapshot(self, directory: str | Path) -> Path:
        """Write the whole state to directory/buffer.msgpack (msgpack, no pickle). It is always written
        into a checkpoint's staging directory, which makes it durable and atomic with the rest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            payload = {
                "format": 1,
                "incomplete": {g: [t.to_dict() for t in ts] for g, ts in self._state.incomplete.items()},
                "ready": [[g, [t.to_dict() for t in self._state.ready[g]]] for *_, g in sorted(self._state.heap)],
                "seen": sorted(self._state.seen),
                "dropped": sorted(self._state.dropped),
                "counters": vars(self._counters).copy(),
                "last_staleness": list(self._last_staleness),
                "staleness_cap": self._dynamic_cap,
            }
        self.last_snapshot_seen: list[str] = payload["seen"]
        path = directory / SNAPSHOT_FILE
        path.write_bytes(msgpack.packb(payload, use_bin_type=True))  # sealed (fsync, checksum) with its checkpoint
        return path

    def seen_groups(self, group_ids: list[str]) -> list[str]:
        """Those of group_ids the buffer ever accepted a sample of (trained, held or dropped),
        or holds a put for that is waiting for room (it will land even if its sender died):
        what an engine that died had already delivered, so it is not generated again."""
        with self._lock:
            arriving = {tid.rsplit("/", 1)[0] for tid in self._incoming}
            return sorted(g for g in set(group_ids) if g in self._state.seen_groups or g in arriving)

    def snapshot_seen_groups(self, directory: str | Path) -> list[str]:
        """Snapshot, and return the ids of every group the buffer had received by then (held,
        trained or dropped): a resumed run regenerates exactly the groups not among them."""
        self.snapshot(directory)
        return sorted({tid.rsplit("/", 1)[0] for tid in self.last_snapshot_seen})

    @classmethod
    def restore(cls, directory: str | Path, cfg: BufferConfig | None = None) -> ReplayBuffer:
        path = Path(directory) / SNAPSHOT_FILE
        try:
            payload = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        except (OSError, ValueError, msgpack.ExtraData) as err:
            raise ValueError(f"cannot restore the buffer from {path}: {err}") from err
        buf = cls(cfg)
        st = buf._state
        for gid, ts in payload["incomplete"].items():
            st.incomplete[gid] = [Trajectory.from_dict(d) for d in ts]
            st.oldest[gid] = min(t.oldest_version() for t in st.incomplete[gid])
        for gid, ts in payload["ready"]:
            group = [Trajectory.from_dict(d) for d in ts]
            st.oldest[gid] = min(t.oldest_version() for t in group)
            buf._complete(gid, group)
        st.seen, st.dropped = set(payload["seen"]), set(payload["dropped"])
        st.seen_groups = {tid.rsplit("/", 1)[0] for tid in st.seen}
        st.held = sum(map(len, st.incomplete.values())) + sum(map(len, st.ready.values()))
        buf._counters = _Counters(**payload["counters"])
        buf._last_staleness = list(payload["last_staleness"])
        buf._dynamic_cap = payload.get("staleness_cap")  # absent in snapshots from before the dynamic cap
        return buf
