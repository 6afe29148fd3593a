"""Rewards in worker processes: every way a reward can fail marks its sample with the reason,
and the pool (like the engine that owns it) keeps serving."""

from __future__ import annotations

import asyncio
import textwrap
import threading

import pytest

from rollout.rewards import RewardPool
from rollout.tasks.registry import TaskConfig, TaskSample

REWARDS = textwrap.dedent(
    """
    import os, sys, time

    def reward(response, answer):
        if response == "raise":
            raise KeyError("no such key")
        if response == "exit":
            sys.exit(3)
        if response == "crash":
            os._exit(7)
        if response == "hang":
            time.sleep(60)
        if response == "nan":
            return float("nan")
        if response == "huge":
            return 1e39  # finite in float64, inf in float32
        if response == "text":
            return "1.0"
        return 1.0 if response == answer else 0.0
    """
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "user_rewards.py").write_text(REWARDS)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(folder))  # spawned workers inherit sys.path
    pool = RewardPool(TaskConfig(reward_fn="user_rewards:reward", reward_timeout_s=2.0, reward_workers=2))
    yield pool
    pool.close()
    mp.undo()


def scores(pool: RewardPool, responses: list[str]) -> list:
    sample = TaskSample("s", "q", "42")

    async def all_of():
        return await asyncio.gather(*(pool.score(r, sample) for r in responses))

    return asyncio.run(all_of())


def test_good_rewards_score_and_every_failure_is_marked_with_its_reason(pool):
    got = scores(pool, ["42", "41", "raise", "exit", "crash", "hang", "nan", "huge", "text", "42"])
    names = ["right", "wrong", "raise", "exit", "crash", "hang", "nan", "huge", "text", "again"]
    by = dict(zip(names, got, strict=True))
    assert (by["right"].value, by["right"].error) == (1.0, None)
    assert (by["wrong"].value, by["wrong"].error) == (0.0, None)
    assert by["raise"].error == "reward raised KeyError: 'no such key'"
    assert by["exit"].error == "reward raised SystemExit: 3"
    assert by["crash"].error == "reward process died (exit code 7)"
    assert by["hang"].error == "reward timed out after 2s (task.reward_timeout_s)"
    assert by["nan"].error.startswith("reward returned nan")
    assert by["huge"].error == "reward returned 1e+39, not finite in float32"
    assert by["text"].error == "reward returned str '1.0', not a number"
    assert all(r.value == 0.0 for r in got if r.error)
    # the pool replaced the killed and crashed workers: it still scores
    assert (by["again"].value, by["again"].error) == (1.0, None)
    assert [r.value for r in scores(pool, ["42"] * 4)] == [1.0] * 4


def test_a_reward_that_cannot_be_built_marks_every_sample(tmp_path):
    pool = RewardPool(TaskConfig(reward_fn="no_such_module_here:fn", reward_workers=1))
    try:
        (result,) = scores(pool, ["42"])
    finally:
        pool.close()
    assert result.error.startswith("reward could not be built: ValueError: cannot load reward_fn")


def test_math_reward_works_outside_the_main_thread():
    """math-verify's own timeout is signal.alarm, which raises outside the main thread (where
    the rollout actor scores): the math reward must not depend on it."""
    from rollout.tasks.math import math_reward

    out: list = []
    sample = TaskSample("s", "", "12")
    worker = threading.Thread(target=lambda: out.append(math_reward("so it is $\\boxed{12}$", sample)))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_math_rewards_score_in_the_pool():
    pool = RewardPool(TaskConfig(name="math", path="unused.jsonl", reward_workers=1))
    try:
        right, wrong = scores(pool, ["The answer is $\\boxed{42}$.", "It is 41."])
    finally:
        pool.close()
    assert (right.value, right.error, wrong.value, wrong.error) == (1.0, None, 0.0, None)


def traj(i: int, error: str | None = None):
    from buffer.trajectory import Trajectory

    return Trajectory(traj_id=f"g/{i}", group_id="g", group_size=1, prompt_ids=[1], response_ids=[2],
                      behavior_logprobs=[-1.0], token_versions=[0], version_start=0, version_end=0, reward=0.0,
                      extra={"reward_error": error} if error else {})  # fmt: skip


def test_reward_errors_are_logged_once_per_kind_and_counted(caplog):
    from vespo.orchestration.reward_errors import RewardErrors

    errors = RewardErrors(batch_samples=4)
    batch = [traj(0, "reward raised KeyError: 'a'"), traj(1, "reward raised KeyError: 'b'"), traj(2), traj(3)]
    with caplog.at_level("ERROR"):
        assert errors.add(batch, step=0) == 2
        assert errors.add([traj(4, "reward timed out after 2s (task.reward_timeout_s)"), traj(5)], step=1) == 1
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "KeyError: 'a'" in logged[0] and "timed out" in logged[1]
    assert (errors.seen, errors.failed, errors.first) == (6, 3, "reward raised KeyError: 'a'")


def test_a_reward_that_nearly_always_fails_early_stops_the_run():
    from vespo.orchestration.reward_errors import RewardErrors, RewardsFailing

    errors = RewardErrors(batch_samples=10)
    errors.add([traj(i, "reward raised TypeError: bad") for i in range(9)], step=0)  # not a whole batch yet
    with pytest.raises(RewardsFailing, match=r"19 of the first 20 samples failed their reward, e.g. 'reward raised"):
        errors.add([traj(i, "reward raised TypeError: bad") for i in range(10)] + [traj(99)], step=0)
    late = RewardErrors(batch_samples=10)  # the same failures after the first steps are counted, not fatal
    assert late.add([traj(i, "reward raised TypeError: bad") for i in range(20)], step=5) == 20
