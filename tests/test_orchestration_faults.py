"""Engine deaths, with in-process fakes (tests/fakes.py) behind the real fleet, weight sync,
sources and buffer: an engine that dies holding groups, or in a weight broadcast, is
restarted, joins a new weight group, gets the current weights before any prompt, and what it
held is generated again and trained once; one Ray will not bring back stops the run with a
message that says how to resume. Real engines: tests/test_engine_faults.py."""

from __future__ import annotations

import pytest
from fakes import FakeEngine, FakeLearner, assemble, fake_config

from buffer.replay import ReplayBuffer
from learner import checkpoint
from vespo.orchestration.contracts import Done, EngineLost
from vespo.orchestration.controller import LearnerFailed

FAULTS = ["buffer.max_staleness=1", "train.steps=6"]


class DiesHolding(FakeEngine):
    """Never finishes a group; crashes on its first poll holding `after` of them (or in a weight
    broadcast, with crash_on_receive); restarted by Ray, it generates normally."""

    def __init__(self, *args, after: int | None = None, **kwargs):
        super().__init__(*args, hold=True, **kwargs)
        self.after = after

    def poll(self) -> tuple[int, list]:
        with self.lock:
            if self.after is not None and len(self.pending) >= self.after:
                self.after = None
                self.kill()
            return super().poll()

    def restart(self, timeout_s: float) -> dict:
        self.hold = False
        return super().restart(timeout_s)


def first(events: list, kind: str, name: str, after: int = 0) -> int:
    return next(i for i, e in enumerate(events) if i >= after and e[:2] == (kind, name))


def check_recovered(summary, controller, engines: list[FakeEngine], events: list, buf: ReplayBuffer) -> list[str]:
    """What every recovery of engine-1 must show; returns the groups it held when it died."""
    lost = engines[1].killed_with
    assert sorted(summary.requeued_groups) == sorted(lost)  # exactly what it held, nothing it delivered
    assert summary.engine_restarts == 1 and controller.learner.groups_formed == 2  # a new weight group for all
    assert len(summary.trained_groups) == len(set(summary.trained_groups))  # nothing trained twice
    assert set(lost) <= set(summary.trained_groups)  # and what it held is trained after all
    assert buf.metrics()["buffer/abandoned_groups"] == len(lost)  # their admission slots were let go of
    back = first(events, "restart", "engine-1")
    received = first(events, "receive", "engine-1", back)
    assert received < first(events, "submit", "engine-1", back)  # weights before any prompt
    version = events[received][2]
    assert ("receive", "engine-0", version) in events[back:received]  # the current ones: the others have them too
    assert all(v >= version for kind, _, v in events[received:] if kind == "receive")
    return lost


@pytest.mark.parametrize(("mode", "holding"), [("async", 2), ("sync", 1)])  # sync: its share of a 2-prompt round
def test_an_engine_that_dies_holding_groups_is_restarted_and_they_are_trained_once(tmp_path, mode, holding):
    cfg = fake_config(tmp_path, *FAULTS, f"train.mode={mode}")
    buf, events = ReplayBuffer(cfg.buffer), []
    dying = DiesHolding("engine-1", buf, after=holding, events=events)
    engines = [FakeEngine("engine-0", buf, events=events), dying]
    controller = assemble(cfg, buf, engines, FakeLearner())
    summary = controller.run(checkpoint=False)
    assert summary.steps == 6
    lost = check_recovered(summary, controller, engines, events, buf)
    assert len(lost) == holding
    resent = [gid for kind, _, gid in events[first(events, "restart", "engine-1") :] if kind == "submit"]
    assert resent[: len(lost)] == lost  # handed out again first, under the same group ids


@pytest.mark.parametrize(("mode", "dying", "holding"), [("async", DiesHolding, 2), ("sync", FakeEngine, 0)])
def test_an_engine_that_dies_in_a_weight_broadcast_is_restarted_and_sent_them_again(tmp_path, mode, dying, holding):
    """In async mode it dies with groups in it; in sync mode a round is over before its weights
    are published, so it holds none."""
    cfg = fake_config(tmp_path, *FAULTS, f"train.mode={mode}")
    buf, events = ReplayBuffer(cfg.buffer), []
    engines = [FakeEngine("engine-0", buf, events=events), dying("engine-1", buf, events=events)]
    engines[1].crash_on_receive = 1  # in the first publish, after step 1
    controller = assemble(cfg, buf, engines, FakeLearner())
    summary = controller.run(checkpoint=False)
    assert summary.steps == 6
    assert len(check_recovered(summary, controller, engines, events, buf)) == holding
    assert engines[0].versions_received[:2] == [1, 1]  # the broadcast that failed, then the new group's
    assert engines[1].versions_received[0] == 1 and summary.version == 6


def test_a_restarted_engine_is_fed_only_once_it_has_the_weights(tmp_path):
    cfg = fake_config(tmp_path, *FAULTS)
    buf = ReplayBuffer(cfg.buffer)
    engines = [FakeEngine(f"engine-{i}", buf, hold=True) for i in range(2)]
    fleet = assemble(cfg, buf, engines, FakeLearner()).fleet
    fleet.feed(0, per_engine=1)
    engines[1].kill()
    fleet.feed(0, per_engine=1)  # the poll finds it dead
    assert fleet.dead == {1} and fleet.restart_dead() == [1]
    assert (fleet.dead, fleet.restarting) == (set(), {1})
    fleet.feed(0, per_engine=2)
    assert len(engines[1].submitted) == 1  # restarted, no weights yet: nothing new for it
    fleet.back([1])
    assert fleet.requeued == engines[1].killed_with and not fleet.restarting
    fleet.feed(0, per_engine=2)
    assert engines[1].submitted[1:2] == fleet.requeued  # now it is fed, what it lost first


class CrashesInRecovery(FakeEngine):
    """Healthy in the first broadcast, crashes in the second (the one re-sending to a restarted peer)."""

    broadcasts = 0

    def receive_weights(self, plan: list, version: int) -> Done:
        self.broadcasts += 1
        self.crash_on_receive = int(self.broadcasts == 2)
        return super().receive_weights(plan, version)


def test_engines_that_die_one_after_the_other_in_broadcasts_are_all_fed_again(tmp_path):
    cfg = fake_config(tmp_path, *FAULTS)
    buf, events = ReplayBuffer(cfg.buffer), []
    engines = [CrashesInRecovery("engine-0", buf, events=events), FakeEngine("engine-1", buf, events=events)]
    engines[1].crash_on_receive = 1  # the first publish: engine-1 dies; re-sending to it, engine-0 dies
    controller = assemble(cfg, buf, engines, FakeLearner())
    summary = controller.run(checkpoint=False)
    assert [e for kind, e, _ in events if kind == "kill"] == ["engine-1", "engine-0"]
    assert summary.steps == 6 and summary.engine_restarts == 2 and not controller.fleet.restarting
    for name in ("engine-0", "engine-1"):
        back = first(events, "restart", name)
        assert first(events, "receive", name, back) < first(events, "submit", name, back)  # fed again, after weights


# -- engines that do not come back ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_lost_engine_stops_the_run_saying_no_checkpoint_was_written(tmp_path, mode):
    cfg = fake_config(tmp_path, f"train.mode={mode}")
    buf = ReplayBuffer(cfg.buffer)
    engines = [FakeEngine("engine-0", buf)]
    controller = assemble(cfg, buf, engines, FakeLearner())
    engines[0].lose()
    with pytest.raises(LearnerFailed, match="no checkpoint was written yet") as failed:
        controller.run()
    assert isinstance(failed.value.__cause__, EngineLost) and "at step 0" in str(failed.value)


class LostAt(FakeEngine):
    """Gone for good when the weights of `version` reach it (Ray out of restarts)."""

    def __init__(self, *args, version: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.lose_at = version

    def receive_weights(self, plan: list, version: int) -> Done:
        if version == self.lose_at:
            self.lose()
        return super().receive_weights(plan, version)


def test_a_lost_engine_after_a_checkpoint_says_how_to_resume_from_it(tmp_path):
    cfg = fake_config(tmp_path, "train.checkpoint_every=1", "train.steps=6")
    buf = ReplayBuffer(cfg.buffer)
    controller = assemble(cfg, buf, [LostAt("engine-0", buf, version=2)], FakeLearner())
    with pytest.raises(LearnerFailed) as failed:
        controller.run()
    root = tmp_path / "checkpoints"
    message = str(failed.value)
    assert f"vespo train --resume {root}" in message and "at step 2" in message
    assert f"the last checkpoint is {checkpoint.latest(root)}" in message
    assert checkpoint.read_meta(checkpoint.latest(root)).step == 1  # the step before the loss


class NotBack(FakeEngine):
    def restart(self, timeout_s: float) -> dict:
        raise EngineLost(f"{self.name} did not come back in {timeout_s}s")


def test_an_engine_that_does_not_come_back_stops_the_run(tmp_path):
    cfg = fake_config(tmp_path)
    buf = ReplayBuffer(cfg.buffer)
    engines = [NotBack("engine-0", buf)]
    controller = assemble(cfg, buf, engines, FakeLearner())
    engines[0].kill()
    with pytest.raises(LearnerFailed, match="did not come back"):
        controller.run()
