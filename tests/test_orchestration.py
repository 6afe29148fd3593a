"""The training loop's scheduling, run with in-process fakes (tests/fakes.py) behind the real
fleet, sources, weight sync, buffer and checkpoint code: admission, sync-N rounds, stop,
resume, down-weighting and what the learner is kept from seeing. Faults (engine deaths,
lost engines) are in test_orchestration_faults.py, failed groups in test_group_failures.py.
Each test takes well under a few seconds and starts neither Ray nor vLLM."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fakes import FakeEngine, FakeLearner, FakeLogger, Running, assemble, fake_config, make_group, wait_until

from buffer.replay import ReplayBuffer
from buffer.trajectory import Trajectory
from learner import checkpoint
from rollout.records import PromptItem


def live_groups(buffer: ReplayBuffer) -> int:
    """Groups admitted and still counted in flight by the admission rule."""
    c = buffer._counters
    return c.started_groups - c.dropped_groups - c.abandoned_groups


def position(gid: str) -> str:
    """'e0-p4-train-17' -> 'p4': where in the epoch a group's prompt came from."""
    return gid.split("-")[1]


# -- admission --------------------------------------------------------------------------------


def test_admission_stops_handing_out_at_the_cap_while_nothing_comes_back(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=1", "train.max_inflight_groups=16")
    buf = ReplayBuffer(cfg.buffer)
    engines = [FakeEngine(f"engine-{i}", buf, hold=True) for i in range(2)]
    run = Running(assemble(cfg, buf, engines, FakeLearner()))
    cap = (0 + 1 + 1) * 2  # (step + max_staleness + 1) * groups_per_step
    wait_until(lambda: sum(len(e.submitted) for e in engines) >= cap)
    time.sleep(0.3)  # the feeder keeps polling: the engines have room (16 each), admission says no
    assert sum(len(e.submitted) for e in engines) == cap and buf._counters.started_groups == cap
    run.controller.request_stop("test")
    assert run.result().steps == 0


class Trickle(FakeEngine):
    """Finishes one group per poll and checks, at every hand-out, that the groups in flight are
    within the admission cap for the learner's step at that moment."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, hold=True, **kwargs)
        self.bound = lambda: math.inf
        self.slack: list[float] = []

    def poll(self) -> tuple[int, list]:
        self.release(1)
        return super().poll()

    def submit(self, items: list[PromptItem]) -> None:
        super().submit(items)
        self.slack.append(self.bound() - live_groups(self.buffer))


def test_admission_holds_at_every_hand_out_and_no_batch_is_staler_than_the_cap(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=1", "train.sync_every=2", "train.max_inflight_groups=4",
                      "train.steps=8")  # fmt: skip
    buf = ReplayBuffer(cfg.buffer)
    engines = [Trickle(f"engine-{i}", buf) for i in range(2)]
    learner = FakeLearner()
    controller = assemble(cfg, buf, engines, learner)
    for e in engines:
        e.bound = lambda: (controller.step + 1 + 1) * 2
    summary = controller.run(checkpoint=False)
    slack = [s for e in engines for s in e.slack]
    assert slack and min(slack) == 0  # admission, not the engines' room, limited what was started
    assert summary.steps == 8 and all(max(b.staleness) <= 1 for b in learner.batches)
    assert summary.max_batch_staleness == 1  # the data was off-policy, just not beyond the cap
    assert buf._counters.started_groups == sum(len(e.submitted) for e in engines)


# -- sync mode: rounds of N ---------------------------------------------------------------------


def rounds_of(events: list) -> list[list]:
    """The events between trains: [before the 1st train, between the 1st and 2nd, ...]."""
    out = [[]]
    for event in events:
        if event[0] == "train":
            out.append([])
        else:
            out[-1].append(event)
    return out


def test_sync_rounds_hand_out_n_steps_of_prompts_then_train_n_times_on_them(tmp_path):
    cfg = fake_config(tmp_path, "train.mode=sync", "train.staleness_ratio=3", "buffer.max_staleness=2",
                      "train.steps=6")  # fmt: skip
    buf, events = ReplayBuffer(cfg.buffer), []
    engines = [FakeEngine(f"engine-{i}", buf, events=events) for i in range(2)]
    learner = FakeLearner(events)
    summary = assemble(cfg, buf, engines, learner).run(checkpoint=False)
    between = rounds_of(events)
    for start in (0, 3):  # a round's 6 prompts are all handed out before its first update, 3 to each engine
        submits = Counter(name for kind, name, _ in between[start] if kind == "submit")
        assert submits == {"engine-0": 3, "engine-1": 3}
        assert all(kind != "submit" for b in between[start + 1 : start + 3] for kind, _, _ in b)
    assert [kind for kind, *_ in between[3]][:2] == ["receive", "receive"]  # new weights, then the round
    assert [b.staleness for b in learner.batches] == [[0] * 4, [1] * 4, [2] * 4] * 2  # update k: k versions old
    assert [e.versions_received for e in engines] == [[3, 6], [3, 6]]
    assert summary.steps == 6 and len(set(summary.trained_groups)) == 12
    marks = summary.step_clocks  # one mark a step, its clocks as they stood then, ending where the run's end
    pairs = zip(marks, marks[1:], strict=False)
    assert len(marks) == 6 and all(a["wall"] <= b["wall"] and a["train"] <= b["train"] for a, b in pairs)
    assert marks[-1]["train"] == summary.clock["train"] and marks[-1]["wall"] <= summary.wall_s


class Refusing(FakeEngine):
    """Refuses the prompts at the given positions of the epoch (as a too-long prompt is)."""

    def __init__(self, *args, refuse: set[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse = refuse

    def submit(self, items: list[PromptItem]) -> None:
        for item in items:
            if position(item.group_id) in self.refuse:
                self.fail[item.group_id] = ("PromptError: too long", True)
        super().submit(items)


@pytest.mark.parametrize(
    ("refuse", "sizes", "staleness", "versions"),
    [
        ({"p1", "p4"}, [4, 4, 4, 4, 4], [0, 1, 0, 1, 2], [2, 5]),  # 2 steps of data: the round ends after 2
        ({"p1"}, [4, 4, 2, 4, 4, 4], [0, 1, 2, 0, 1, 2], [3, 6]),  # 5 groups: the 3rd update has the one left
    ],
)
def test_a_sync_round_that_ends_short_trains_what_it_has_and_moves_on(tmp_path, refuse, sizes, staleness, versions):
    cfg = fake_config(tmp_path, "train.mode=sync", "train.staleness_ratio=3", "buffer.max_staleness=2",
                      f"train.steps={len(sizes)}")  # fmt: skip
    buf, events = ReplayBuffer(cfg.buffer), []
    engines = [Refusing(f"engine-{i}", buf, refuse=refuse, events=events) for i in range(2)]
    learner = FakeLearner(events)
    controller = assemble(cfg, buf, engines, learner)
    summary = controller.run(checkpoint=False)
    # the next round is handed out whole (the refused prompts let go of their admission slots)
    submits = [sum(kind == "submit" for kind, *_ in b) for b in rounds_of(events)]
    assert submits == [6 if k in (0, versions[0]) else 0 for k in range(len(sizes) + 1)]
    assert [len(b.trajectories) for b in learner.batches] == sizes
    assert [set(b.staleness) for b in learner.batches] == [{s} for s in staleness]
    assert [e.versions_received for e in engines] == [versions, versions]
    assert controller.fleet.refused_prompts == len(refuse) and summary.steps == len(sizes)
    trained = [position(g) for g in summary.trained_groups]
    assert not refuse & set(trained) and len(trained) == len(set(summary.trained_groups))
    assert "vllm" not in sys.modules


class SkipsRoundEnd(FakeEngine):
    """The groups of the 2nd update of the first round come back with NaN log-probs: nothing to train."""

    def group(self, item: PromptItem, n: int | None = None) -> list[Trajectory]:
        trajs = super().group(item, n)
        if position(item.group_id) in ("p2", "p3"):
            for t in trajs:
                t.behavior_logprobs[0] = float("nan")
        return trajs


def test_a_round_whose_last_batch_is_skipped_still_starts_the_next_with_the_current_weights(tmp_path):
    cfg = fake_config(tmp_path, "train.mode=sync", "train.staleness_ratio=2", "buffer.max_staleness=1",
                      "train.steps=3")  # fmt: skip
    buf, learner = ReplayBuffer(cfg.buffer), FakeLearner()
    engine = SkipsRoundEnd("engine-0", buf)
    assemble(cfg, buf, [engine], learner).run(checkpoint=False)
    assert [b.staleness for b in learner.batches] == [[0] * 4, [0] * 4, [1] * 4]  # round 2 has step 1's weights
    assert engine.versions_received == [1, 3] and buf.metrics()["buffer/dropped_groups"] == 0


# -- stop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_stop_request_ends_a_run_waiting_for_data_that_never_comes(tmp_path, mode):
    cfg = fake_config(tmp_path, f"train.mode={mode}")
    buf = ReplayBuffer(cfg.buffer)
    engines = [FakeEngine("engine-0", buf, hold=True)]
    run = Running(assemble(cfg, buf, engines, FakeLearner()), checkpoint=True)
    wait_until(lambda: engines[0].submitted)
    time.sleep(0.2)
    asked = time.perf_counter()
    run.controller.request_stop("SIGTERM")
    summary = run.result(timeout=5)
    assert time.perf_counter() - asked < 2.0
    assert summary.stopped == "SIGTERM" and summary.steps == 0
    state = json.loads((checkpoint.latest(summary.checkpoint) / "controller" / "state.json").read_text())
    assert sorted(g for g, _ in state["requeue"]) == sorted(engines[0].submitted)  # what it held: handed out again


# -- resume -----------------------------------------------------------------------------------


def test_a_resumed_run_continues_at_its_step_and_trains_every_group_once(tmp_path):
    settings = ["buffer.max_staleness=2", "train.max_inflight_groups=4"]  # groups wait in the buffer too
    cfg = fake_config(tmp_path, *settings, "train.steps=3")
    buf = ReplayBuffer(cfg.buffer)
    engines = [FakeEngine("engine-0", buf), FakeEngine("engine-1", buf, hold=True)]  # engine-1 never finishes
    first = assemble(cfg, buf, engines, FakeLearner()).run()
    held = [i.group_id for i in engines[1].pending]
    assert first.steps == 3 and held
    found = checkpoint.latest(first.checkpoint)
    requeue = [g for g, _ in json.loads((found / "controller" / "state.json").read_text())["requeue"]]
    assert set(held) <= set(requeue)

    cfg = fake_config(tmp_path, *settings, "train.steps=6")
    buf = ReplayBuffer.restore(found / "buffer", cfg.buffer)
    in_snapshot = set(buf.seen_groups([g for e in engines for g in e.submitted]))
    waiting = in_snapshot - set(first.trained_groups)  # generated, not trained yet: restored with the buffer
    assert waiting and not waiting & set(requeue)
    events, learner = [], FakeLearner()
    engines = [FakeEngine(f"engine-{i}", buf, events=events) for i in range(2)]
    resumed = assemble(cfg, buf, engines, learner, resume_from=found)
    assert resumed.step == 3 and learner.step == 3  # the learner's own state came back too
    assert [e.versions_received for e in engines] == [[3], [3]]  # the restored weights, before any prompt
    second = resumed.run(checkpoint=False)
    assert second.steps == 6
    both = first.trained_groups + second.trained_groups
    assert len(both) == len(set(both))  # nothing trained twice across the two runs
    assert set(requeue) | waiting <= set(second.trained_groups)  # what was in flight or waiting is trained, once
    again = [gid for kind, _, gid in events if kind == "submit"]
    assert again[: len(requeue)] == requeue  # handed out again first, under the same group ids
    assert not in_snapshot & set(again)  # nothing the buffer snapshot holds is generated again


class FeedsWhileSaving(FakeLearner):
    """Hands out a prompt right after the buffer snapshot, as the feeder thread does while a
    real learner writes its checkpoint."""

    def __init__(self):
        super().__init__()
        self.meanwhile = lambda: None

    def save_checkpoint(self, root: Path, step: int, version: int, extra: dict, keep: int) -> Path:
        def snapshot_then_feed(path: Path) -> None:
            extra["buffer"](path)
            self.meanwhile()

        return super().save_checkpoint(root, step, version, {**extra, "buffer": snapshot_then_feed}, keep)


def test_a_prompt_handed_out_while_a_checkpoint_is_written_is_handed_out_again_on_resume(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=1")
    buf, learner = ReplayBuffer(cfg.buffer), FeedsWhileSaving()
    engine = FakeEngine("engine-0", buf, hold=True)
    controller = assemble(cfg, buf, [engine], learner)
    controller.fleet.feed(0, per_engine=1)
    learner.meanwhile = lambda: controller.fleet.feed(0, per_engine=2)
    found = controller.checkpoint()
    assert len(engine.submitted) == 2  # one before the snapshot, one after it
    buf = ReplayBuffer.restore(found / "buffer", cfg.buffer)
    resumed = assemble(cfg, buf, [FakeEngine("engine-0", buf)], FakeLearner(), resume_from=found)
    assert [resumed.prompts.next()[0] for _ in range(2)] == engine.submitted  # neither is skipped
    assert live_groups(buf) == 0  # and the admission count holds neither


# -- down-weighting ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_group_staler_than_the_cap_is_down_weighted_in_both_modes(tmp_path, mode):
    extra = ["train.staleness_ratio=2"] if mode == "sync" else []
    cfg = fake_config(tmp_path, f"train.mode={mode}", "buffer.max_staleness=1", "buffer.stale_policy=downweight",
                      "buffer.downweight_decay=0.5", "train.steps=5", *extra)  # fmt: skip
    buf = ReplayBuffer(cfg.buffer)
    learner = FakeLearner()
    controller = assemble(cfg, buf, [FakeEngine("engine-0", buf)], learner)
    controller.step = 3  # a run at step 3 whose engines hold the weights of step 3 ...
    controller.weights.publish(3)
    buf.put_many(make_group("old", 2, version=0))  # ... and a group left from version 0: 2 versions past the cap
    summary = controller.run(checkpoint=False)
    first = learner.batches[0]
    by_group = {t.group_id: (w, s) for t, w, s in zip(first.trajectories, first.weights, first.staleness, strict=True)}
    assert by_group.pop("old") == (0.5**2, 3)
    assert by_group and all(w == 1.0 for w, _ in by_group.values())  # fresh data keeps its full weight
    assert all(w == 1.0 for b in learner.batches[1:] for w in b.weights)
    assert summary.trained_groups.count("old") == 1


# -- what the learner never sees --------------------------------------------------------------


class Corrupting(FakeEngine):
    """The first groups come back damaged: a failed reward, a NaN log-prob, a non-finite reward."""

    def group(self, item: PromptItem, n: int | None = None) -> list[Trajectory]:
        trajs = super().group(item, n)
        where = position(item.group_id)
        if where == "p0":
            trajs[0].extra["reward_error"] = "reward raised KeyError: 'answer'"
        elif where == "p1":
            trajs[1].behavior_logprobs[0] = float("nan")
        elif where == "p2":
            trajs[0].reward = float("inf")
        return trajs


def test_samples_with_a_failed_reward_or_non_finite_values_never_reach_the_learner(tmp_path):
    import ray

    cfg = fake_config(tmp_path, "buffer.max_staleness=1", "train.steps=3")
    buf, logger, learner = ReplayBuffer(cfg.buffer), FakeLogger(), FakeLearner()
    summary = assemble(cfg, buf, [Corrupting("engine-0", buf)], learner, logger).run(checkpoint=False)
    assert {"p0", "p1", "p2"} <= {position(g) for g in summary.trained_groups}
    seen = [(position(t.group_id), t.traj_id.rsplit("/", 1)[1]) for b in learner.batches for t in b.trajectories]
    assert {("p0", "0"), ("p1", "1"), ("p2", "0")}.isdisjoint(seen) and ("p0", "1") in seen  # its sibling trains
    assert all(len(b.weights) == len(b.staleness) == len(b.trajectories) for b in learner.batches)
    last = logger.metrics[-1]
    assert last["faults/reward_errors"] == 1 and last["data/skipped_nonfinite"] == 2
    assert not ray.is_initialized() and "vllm" not in sys.modules


class AllNaN(FakeEngine):
    def group(self, item: PromptItem, n: int | None = None) -> list[Trajectory]:
        trajs = super().group(item, n)
        if position(item.group_id) in ("p0", "p1"):
            for t in trajs:
                t.behavior_logprobs[1] = float("nan")
        return trajs


def test_a_batch_none_of_whose_samples_can_train_is_skipped_and_the_run_goes_on(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=1", "train.steps=2")
    buf, logger, learner = ReplayBuffer(cfg.buffer), FakeLogger(), FakeLearner()
    controller = assemble(cfg, buf, [AllNaN("engine-0", buf)], learner, logger)
    summary = controller.run(checkpoint=False)
    assert summary.steps == 2 and len(learner.batches) == 2  # the skipped batch was no step
    assert not {"p0", "p1"} & {position(t.group_id) for b in learner.batches for t in b.trajectories}
    assert {"p0", "p1"} <= {position(g) for g in summary.trained_groups}  # taken, settled, not handed out again
    assert logger.metrics[-1]["data/skipped_nonfinite"] == 4
