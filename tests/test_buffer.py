"""The replay buffer: staleness cap, whole groups, no loss, no duplicates, backpressure, snapshots."""

from __future__ import annotations

import threading
import time

import pytest
from buffer_fixtures import group, traj
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from buffer import BufferConfig, BufferFull, ReplayBuffer, Trajectory
from buffer.staleness import may_start


def test_groups_are_returned_whole_and_oldest_first():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=10))
    buf.put_many(group("new", 2, version=3) + group("old", 2, version=1))
    buf.put_many(group("partial", 3, version=0)[:2])  # incomplete: never returned
    batch = buf.get_batch(2, current_version=3)
    assert [t.group_id for t in batch.trajectories] == ["old", "old", "new", "new"]
    assert batch.staleness == [2, 2, 0, 0] and batch.num_groups == 2
    assert buf.get_batch(1, current_version=3) is None


def test_stale_groups_are_dropped_and_counted():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=2))
    buf.put_many(group("a", 2, version=0) + group("b", 2, version=3))
    mixed = [traj("m", 0, 2, [5, 5]), traj("m", 1, 2, [1, 5, 5])]  # a partial rollout: oldest token counts
    buf.put_many(mixed)
    batch = buf.get_batch(2, current_version=5, timeout=0)
    assert batch is None  # only "b" is fresh enough
    m = buf.metrics()
    assert m["buffer/dropped_stale"] == 4 and m["buffer/dropped_groups"] == 2
    assert buf.get_batch(1, current_version=5).trajectories[0].group_id == "b"


def test_downweight_policy_keeps_stale_groups_with_a_weight():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=1, stale_policy="downweight", downweight_decay=0.5))
    buf.put_many(group("a", 2, version=0) + group("b", 2, version=4))
    batch = buf.get_batch(2, current_version=4)
    assert batch.weights == [0.125, 0.125, 1.0, 1.0]  # "a" is 3 versions past the cap


def test_late_members_of_a_dropped_group_are_counted_not_held():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=1))
    g = group("g", 3, version=0)
    buf.put_many(g[:2])
    assert buf.get_batch(1, current_version=5) is None  # drops the stale incomplete group
    buf.put(g[2])
    m = buf.metrics()
    assert m["buffer/held"] == 0 and m["buffer/dropped_stale"] == 3


def test_backpressure_waits_then_refuses_without_losing_data():
    buf = ReplayBuffer(BufferConfig(capacity=4, max_staleness=5))
    buf.put_many(group("a", 2, 0) + group("b", 2, 0))
    with pytest.raises(BufferFull, match="holds 4 of 4"):
        buf.put_many(group("c", 2, 0), timeout=0.05)
    assert buf.metrics()["buffer/held"] == 4  # nothing of "c" went in

    def consume():
        buf.get_batch(1, current_version=0, timeout=5)

    threading.Timer(0.1, consume).start()
    buf.put_many(group("c", 2, 0), timeout=5)  # waits until the learner takes a group
    assert buf.metrics()["buffer/held"] == 4 and buf.metrics()["buffer/put_wait_s"] > 0.05


def test_seen_groups_counts_stored_and_waiting_puts():
    """What the controller asks when an engine dies: which of its groups will arrive anyway.
    A put blocked on a full buffer will land even if its sender is gone."""
    buf = ReplayBuffer(BufferConfig(capacity=4, max_staleness=5))
    buf.put_many(group("a", 2, 0) + group("b", 2, 0))
    waiting = threading.Thread(target=lambda: buf.put_many(group("c", 2, 0), timeout=5))
    waiting.start()
    deadline = time.monotonic() + 5
    while "c" not in buf.seen_groups(["c"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert buf.seen_groups(["a", "c", "d"]) == ["a", "c"]  # c: blocked for room, not yet stored
    buf.get_batch(1, current_version=0)
    waiting.join()
    assert buf.seen_groups(["a", "c", "d"]) == ["a", "c"] and buf.metrics()["buffer/held"] == 4


def test_abandoned_groups_free_admission_room():
    """Groups admitted but lost with a dead engine must not count as in flight for ever."""
    buf = ReplayBuffer(BufferConfig(max_staleness=1, groups_per_step=2))
    admitted = 0
    while buf.may_start(current_version=0):
        admitted += 1
    assert admitted == 4  # (0 + 1 + 1) versions x 2 groups
    buf.abandon(3)  # their engine died; they will be handed out again
    assert [buf.may_start(0) for _ in range(4)] == [True, True, True, False]
    assert buf.metrics()["buffer/abandoned_groups"] == 3


def test_admitting_many_at_once_follows_the_same_rule_as_one_at_a_time():
    """The feeder asks once per engine per round: the answer must be what as many single asks give."""
    one, many = (ReplayBuffer(BufferConfig(max_staleness=2, groups_per_step=3)) for _ in range(2))
    for version, wanted in [(0, 5), (0, 10), (1, 2), (1, 9), (4, 20)]:
        singles = 0
        while singles < wanted and one.may_start(version):
            singles += 1
        assert many.admit(version, wanted) == singles
    assert many.admit(4, 0) == 0 and many._counters.started_groups == one._counters.started_groups


def test_blocking_get_wakes_up_when_a_group_completes():
    buf = ReplayBuffer(BufferConfig(capacity=10))
    threading.Timer(0.1, lambda: buf.put_many(group("g", 2, 0))).start()
    batch = buf.get_batch(1, current_version=0, timeout=5)
    assert batch is not None and buf.metrics()["buffer/get_wait_s"] > 0.05


def test_duplicates_are_refused():
    buf = ReplayBuffer()
    buf.put_many(group("g", 2, 0))
    with pytest.raises(ValueError, match="already in the buffer's history"):
        buf.put(group("g", 2, 0)[0])


def test_admission_rule():
    assert may_start(started_groups=0, current_version=0, max_staleness=0, groups_per_step=2)
    assert not may_start(2, 0, 0, 2)  # one step's worth started at version 0 with no slack
    assert may_start(5, 0, 2, 2) and not may_start(6, 0, 2, 2)
    assert may_start(6, 1, 2, 2)  # the learner advanced: room for one more step's worth
    buf = ReplayBuffer(BufferConfig(max_staleness=1, groups_per_step=2))
    assert [buf.may_start(0) for _ in range(5)] == [True, True, True, True, False]
    assert buf.may_start(1)


def test_snapshot_round_trip(tmp_path):
    buf = ReplayBuffer(BufferConfig(capacity=50, max_staleness=2))
    buf.put_many(group("a", 2, 0) + group("b", 3, 1)[:2] + group("c", 2, 2))
    buf.get_batch(1, current_version=2)
    buf.may_start(2)
    buf.snapshot(tmp_path)
    again = ReplayBuffer.restore(tmp_path, buf.cfg)
    assert again.metrics() == buf.metrics()
    assert again.held_ids() == buf.held_ids()
    assert again.get_batch(1, 2).trajectories[0].traj_id == buf.get_batch(1, 2).trajectories[0].traj_id
    (tmp_path / "buffer.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot restore the buffer"):
        ReplayBuffer.restore(tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        BufferConfig(capacity=0)
    with pytest.raises(ValueError, match="stale_policy must be"):
        BufferConfig(stale_policy="keep")


class BufferMachine(RuleBasedStateMachine):
    """Random puts (whole and partial groups, mixed versions), gets at a rising version, snapshots."""

    def __init__(self):
        super().__init__()
        self.buf = ReplayBuffer(BufferConfig(capacity=40, max_staleness=2))
        self.version = 0
        self.next_group = 0
        self.pending: list[Trajectory] = []  # members of started groups not yet put
        self.put_ids: set[str] = set()
        self.returned: list[str] = []

    @rule(size=st.integers(1, 4), lag=st.integers(0, 4), split=st.booleans())
    def start_group(self, size, lag, split):
        gid = f"g{self.next_group}"
        self.next_group += 1
        members = [traj(gid, i, size, [max(self.version - lag, 0), self.version]) for i in range(size)]
        now = members[: size // 2] if split else members
        self.pending += members[len(now) :]
        self._put(now)

    @precondition(lambda self: self.pending)
    @rule()
    def finish_pending(self):
        batch, self.pending = self.pending, []
        self._put(batch)

    def _put(self, batch):
        try:
            self.buf.put_many(batch, timeout=0)
        except BufferFull:
            self.pending += batch  # a real producer keeps it and retries
            return
        self.put_ids |= {t.traj_id for t in batch}

    @rule(n=st.integers(1, 3))
    def get(self, n):
        batch = self.buf.get_batch(n, self.version, timeout=0)
        if batch is None:
            return
        assert max(batch.staleness) <= self.buf.cfg.max_staleness
        sizes: dict[str, int] = {}
        for t in batch.trajectories:
            sizes[t.group_id] = sizes.get(t.group_id, 0) + 1
            assert t.staleness(self.version) <= 2
        assert all(sizes[g] == t.group_size for t in batch.trajectories for g in [t.group_id])
        assert len(sizes) == n
        self.returned += [t.traj_id for t in batch.trajectories]

    @rule()
    def advance(self):
        self.version += 1

    @rule()
    def snapshot_and_restore(self):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            self.buf.snapshot(d)
            restored = ReplayBuffer.restore(d, self.buf.cfg)
        assert restored.metrics() == self.buf.metrics() and restored.held_ids() == self.buf.held_ids()
        self.buf = restored

    @invariant()
    def nothing_lost_or_duplicated(self):
        assert len(self.returned) == len(set(self.returned))
        m = self.buf.metrics()
        held = self.buf.held_ids()
        assert held.isdisjoint(self.returned)
        assert m["buffer/put_total"] == len(self.put_ids)
        assert len(self.returned) + m["buffer/dropped_stale"] + len(held) == len(self.put_ids)


BufferMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_buffer_state_machine = BufferMachine.TestCase


def test_packed_round_trip_keeps_every_field():
    from buffer import columnar

    trajs = group("a", 3, 2, length=4) + [traj("b", 0, 1, [])]
    trajs[0].reward_components["format"] = 1.0
    trajs[1].extra["answer"] = "7"
    back = columnar.unpack(columnar.pack(trajs))
    assert [t.to_bytes() for t in back] == [t.to_bytes() for t in trajs]
