"""Groups that fail inside a live engine: the engine reports them, the controller frees their
admission slots, drops refused prompts at once and hands other failures out again a bounded
number of times. Orchestration logic, so a fake engine (fault injection) and a fake buffer
stand in; the real engine's refusals are exercised end to end in tests/test_resume.py."""

from __future__ import annotations

import asyncio

from rollout.actor import PromptError, RolloutActor
from rollout.config import RolloutConfig
from rollout.records import Completion, PromptItem
from rollout.tasks.registry import TaskSample
from vespo import run_config
from vespo.controller import Controller
from vespo.prompts import PromptStream


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


def controller_with(retries: int) -> Controller:
    cfg = run_config.load(None, [f"train.group_retries={retries}", "wandb.mode=disabled"])
    controller = Controller(cfg)
    samples = [TaskSample(id=f"s{i}", prompt=f"{i}+1=", answer=str(i + 1), chat=False) for i in range(4)]
    controller.prompts = PromptStream(samples)
    controller._by_id = {s.id: s for s in samples}
    controller.buffer = FakeBuffer()
    controller.tokenizer = None  # the prompts are not rendered here: plain samples, chat off

    return controller


def test_failures_are_retried_a_bounded_number_of_times_then_dropped():
    controller = controller_with(retries=2)
    attempts, first = 0, None
    while True:
        gid, sample = controller.prompts.next()
        first = first or gid
        assert gid == first  # the same group comes back first, under its id
        controller._handed_out(gid, sample, 0)
        attempts += 1
        controller._failed_groups([(gid, "RuntimeError: engine step failed", False)], release_admission=True)
        if not controller.prompts.requeued:
            break
    assert attempts == 3  # the first try and two retries
    assert (controller.retried_groups, controller.dropped_groups) == (2, 1)
    assert controller.buffer.abandoned == 3 and not controller._submitted  # every slot released
    assert controller.prompts.next()[0].startswith("e0-p1-")  # then the stream goes on


def test_a_refused_prompt_is_dropped_at_once_and_frees_its_slot():
    controller = controller_with(retries=2)
    gid, sample = controller.prompts.next()
    controller._handed_out(gid, sample, 0)
    controller._failed_groups([(gid, "PromptError: too long", True)], release_admission=True)
    assert controller.refused_prompts == 1 and controller.retried_groups == 0 and not controller.prompts.requeued
    assert controller.buffer.abandoned == 1
    # a report for a group already accounted for (an engine recovery requeued it) changes nothing
    controller._failed_groups([(gid, "PromptError: too long", True)], release_admission=True)
    assert controller.refused_prompts == 1 and controller.buffer.abandoned == 1


def test_retries_zero_drops_on_the_first_failure_in_sync_mode_without_touching_admission():
    controller = controller_with(retries=0)
    gid, sample = controller.prompts.next()
    controller._handed_out(gid, sample, 0)
    controller._failed_groups([(gid, "RuntimeError: boom", False)], release_admission=False)
    assert controller.dropped_groups == 1 and controller.buffer.abandoned == 0 and not controller.prompts.requeued
