"""Groups that fail inside a live engine: the engine reports each once, and the fleet frees
its admission slot, drops a refused prompt at once and hands any other failure out again up
to train.group_retries times. The first test runs the real engine actor's reporting on a
fault-injecting generator; the rest drive the real fleet and buffer with an in-process
engine (tests/fakes.py). The real engine's refusals run end to end in tests/test_resume.py."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes import FakeEngine, FakeLearner, FakeLogger, Running, assemble, fake_config, make_item

from buffer.config import BufferConfig
from buffer.replay import ReplayBuffer
from rollout.actor import PromptError, RolloutActor
from rollout.config import RolloutConfig
from rollout.records import Completion, PromptItem
from rollout.tasks.registry import TaskSample
from vespo.orchestration.fleet import EngineFleet
from vespo.orchestration.prompts import PromptStream


class FlakyEngine:
    """Generates one token, except for groups named in `fail` (raises) - fault injection."""

    name = "fake"
    version = 0

    def __init__(self, fail: set[str]):
        self.fail = fail

    async def generate(self, prompt_ids, n, request_id):
        if any(request_id.endswith(g) for g in self.fail):
            raise RuntimeError("engine step failed")
        return [Completion([1], [-0.5], [0], "stop", 0, 0) for _ in range(n)]


class Pushes:
    def __init__(self):
        self.groups: list[str] = []

    async def remote(self, packed, _):
        from buffer import columnar

        self.groups += [t.group_id for t in columnar.unpack(packed)]


class FakeBuffer:
    def __init__(self):
        self.put_packed = Pushes()
        self.abandoned = 0
        outer = self

        class Abandon:
            def remote(self, n):
                outer.abandoned += n

        self.abandon = Abandon()


class Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3] * len(text)}


def test_the_engine_reports_failed_and_refused_groups_once():
    buffer = FakeBuffer()
    actor = RolloutActor(RolloutConfig(model_path="unused", n=2, max_new_tokens=4, max_model_len=16), buffer=buffer)
    actor.engine, actor.tokenizer = FlakyEngine({"bad"}), Tokenizer()
    items = [PromptItem("ok", "1+1="), PromptItem("bad", "1+2="), PromptItem("long", "1" * 40)]

    async def go():
        await actor.submit(items)
        await actor.drain()
        return await actor.poll(), await actor.poll()

    (count, failed), (_, again) = asyncio.run(go())
    assert count == 0 and buffer.put_packed.groups == ["ok", "ok"]
    by_gid = {gid: (why, refused) for gid, why, refused in failed}
    assert set(by_gid) == {"bad", "long"} and not again  # each reported once
    assert by_gid["bad"] == ("RuntimeError: engine step failed", False)
    assert by_gid["long"][1] is True and PromptError.__name__ in by_gid["long"][0]


class Failing(FakeEngine):
    """Fails the given groups every time they are generated (not refused: a retry may work)."""

    def __init__(self, *args, always: set[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.always = always or set()

    def submit(self, items: list[PromptItem]) -> None:
        for item in items:
            if item.group_id in self.always:
                self.fail[item.group_id] = ("RuntimeError: engine step failed", False)
        super().submit(items)


SAMPLES = [TaskSample(id=f"s{i}", prompt=f"{i}+1=", answer=str(i + 1), chat=False) for i in range(4)]
FIRST, SECOND = [gid for gid, _ in PromptStream(SAMPLES).take(2)]


def fleet_with(retries: int, always: set[str] | None = None) -> tuple[EngineFleet, Failing, ReplayBuffer]:
    """A fleet whose admission lets one group be in flight (max_staleness 0, one group a step):
    a failure that did not free its slot would stop all feeding."""
    buf = ReplayBuffer(BufferConfig(max_staleness=0, groups_per_step=1))
    engine = Failing("engine-0", buf, always=always)
    fleet = EngineFleet([engine], buf, PromptStream(SAMPLES), make_item, group_retries=retries)
    fleet.started([engine.start().result()], quiet=True)
    return fleet, engine, buf


def abandoned(buf: ReplayBuffer) -> float:
    return buf.metrics()["buffer/abandoned_groups"]


def test_failures_are_retried_a_bounded_number_of_times_then_dropped():
    fleet, engine, buf = fleet_with(retries=2, always={FIRST})
    for _ in range(4):  # each feed collects the last failure and hands out the next attempt
        fleet.feed(0, per_engine=1)
    assert engine.submitted == [FIRST, FIRST, FIRST, SECOND]  # the first try, two retries, then the stream goes on
    assert (fleet.retried_groups, fleet.dropped_groups, fleet.refused_prompts) == (2, 1, 0)
    assert abandoned(buf) == 3 and list(fleet.held) == [SECOND]  # every failed attempt let go of its slot


def test_a_refused_prompt_is_dropped_at_once_and_frees_its_slot():
    fleet, engine, buf = fleet_with(retries=2)
    fleet.feed(0, per_engine=1)
    engine.fail[FIRST] = ("PromptError: prompt too long", True)
    fleet.feed(0, per_engine=1)
    assert engine.submitted == [FIRST, SECOND] and not fleet.prompts.requeued
    assert (fleet.refused_prompts, fleet.retried_groups, fleet.dropped_groups) == (1, 0, 0)
    assert abandoned(buf) == 1
    # a report for a group already accounted for (an engine recovery requeued it) changes nothing
    fleet.failed([(FIRST, "PromptError: prompt too long", True)])
    assert fleet.refused_prompts == 1 and abandoned(buf) == 1


def test_retries_zero_drops_on_the_first_failure():
    fleet, engine, buf = fleet_with(retries=0, always={FIRST})
    fleet.feed(0, per_engine=1)
    fleet.feed(0, per_engine=1)
    assert engine.submitted == [FIRST, SECOND] and fleet.dropped_groups == 1 and fleet.retried_groups == 0
    assert abandoned(buf) == 1 and not fleet.prompts.requeued


def test_a_group_that_succeeds_on_a_retry_trains_once_and_the_faults_are_on_the_dashboard(tmp_path):
    cfg = fake_config(tmp_path, "train.group_retries=1", "train.steps=4", "buffer.max_staleness=1")
    buf, logger = ReplayBuffer(cfg.buffer), FakeLogger()
    engine = FakeEngine("engine-0", buf)
    controller = assemble(cfg, buf, [engine], FakeLearner(), logger)
    first, second = [gid for gid, _ in PromptStream(controller.prompts.samples, cfg.task.seed).take(2)]
    engine.fail = {first: ("RuntimeError: engine step failed", False), second: ("PromptError: too long", True)}
    summary = controller.run(checkpoint=False)
    assert summary.trained_groups.count(first) == 1 and second not in summary.trained_groups
    assert engine.submitted.count(first) == 2 and engine.submitted.count(second) == 1
    faults = {k: v for k, v in logger.metrics[-1].items() if k.startswith("faults/")}
    assert faults["faults/retried_groups"] == 1 and faults["faults/refused_prompts"] == 1
    assert faults["faults/dropped_groups"] == 0 and faults["faults/engine_restarts"] == 0
    assert logger.metrics[-1]["buffer/abandoned_groups"] == 2  # both failures let go of their slots


class RefusesAll(FakeEngine):
    """Every prompt is too long for it (say, rollout.max_model_len is too small for the task)."""

    def submit(self, items: list[PromptItem]) -> None:
        for item in items:
            self.fail[item.group_id] = ("PromptError: too long", True)
        super().submit(items)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_whose_every_prompt_is_refused_gives_up_after_the_batch_timeout(tmp_path, mode):
    """Sync: each round ends at once with nothing to train, and the rounds must not go on for
    ever. Async: the learner's wait times out, and meanwhile the feeder backs off instead of
    spinning through the dataset (20 rounds a second at most, each at most the admission cap)."""
    cfg = fake_config(tmp_path, f"train.mode={mode}", "train.batch_timeout_s=1")
    buf = ReplayBuffer(cfg.buffer)
    controller = assemble(cfg, buf, [RefusesAll("engine-0", buf)], FakeLearner())
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match="batch_timeout_s"):
        Running(controller).result(timeout=5)
    assert time.perf_counter() - started < 3 and controller.fleet.refused_prompts > 0
    cap = (cfg.buffer.max_staleness + 1) * cfg.train.groups_per_step
    assert controller.fleet.refused_prompts <= 40 * cap * (time.perf_counter() - started)
