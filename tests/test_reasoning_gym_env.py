"""`task.name: env`: the config rules, the environment registry, and the reasoning-gym adapter
(real reasoning-gym generators and verifiers)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from buffer import columnar
from buffer.trajectory import Trajectory
from configtypes import ConfigError
from rollout.envs.registry import make_env_factory
from rollout.tasks.base import TaskConfig
from rollout.tasks.registry import make_task
from vespo.config import run_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.env=reasoning_gym:products"], "task.env is set but task.name is 'arithmetic': set task.name: env"),
        (["task.name=env"], "task.name env needs task.env"),
        (["task.tools=[calculator]"], "task.tools needs task.name: env"),
    ],
)
def test_env_keys_go_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config.load(None, overrides)


def env_cfg(env: str, **kw) -> TaskConfig:
    return TaskConfig(name="env", env=env, train_size=kw.pop("train_size", 32), eval_size=kw.pop("eval_size", 16), **kw)


@pytest.mark.parametrize(
    "env, args, message",
    [
        ("gym:CartPole", {}, "task.env: unknown kind 'gym'; choose one of openai_agent, reasoning_gym, textarena"),
        ("reasoning_gym:product", {}, "reasoning-gym has no dataset 'product'; did you mean products"),
        ("reasoning_gym:products", {"digits": 3}, "task.env_args do not fit reasoning-gym's 'products'"),
    ],
)
def test_a_bad_environment_is_one_line_before_anything_starts(env, args, message):
    with pytest.raises(ValueError, match=message) as err:
        make_env_factory(env_cfg(env, env_args=args))
    assert "\n" not in str(err.value)


def test_reasoning_gym_items_are_seeded_split_and_scored_by_its_verifier():
    cfg = env_cfg("reasoning_gym:products", env_args={"min_digits": 2, "max_digits": 3})
    task = make_task(cfg)
    train, held_out = task.samples("train"), task.samples("eval")
    assert len(train) == 32 and len(held_out) == 16
    assert [s.prompt for s in train] == [s.prompt for s in make_task(cfg).samples("train")]  # every process agrees
    # reasoning-gym seeds item i with seed + i: held-out items must not be training items shifted by one
    assert not {s.prompt for s in train} & {s.prompt for s in held_out}

    async def answer(sample, text):
        env = task.make()
        opening = await env.reset(sample)
        step = await env.step(text)
        return opening, step

    sample = held_out[3]
    opening, right = asyncio.run(answer(sample, f"<answer>{sample.answer}</answer>"))
    assert opening == [{"role": "user", "content": sample.prompt}] and right.done and right.reward == 1.0
    # reasoning-gym's own verifier pays partial credit for a response that contains the answer...
    partial = asyncio.run(answer(sample, f"{sample.answer} {sample.answer}"))[1].reward
    assert 0 < partial < 1
    # ... which task.reward_fn replaces (here: the first number must be the answer, nothing less)
    strict = make_task(env_cfg("reasoning_gym:products", env_args={"min_digits": 2, "max_digits": 3},
                               reward_fn="rollout.tasks.arithmetic:reward"))  # fmt: skip
    env = strict.make()
    asyncio.run(env.reset(sample))
    assert asyncio.run(env.step(f"9{sample.answer}")).reward == 0.0


def test_an_episode_record_keeps_its_mask_through_msgpack_and_packing():
    t = Trajectory("g/0", "g", 1, np.arange(3), np.arange(6), np.zeros(6), np.array([2, 2, -1, -1, 3, 3]), 2, 3,
                   loss_mask=np.array([1, 1, 0, 0, 1, 1]))  # fmt: skip
    for back in (Trajectory.from_bytes(t.to_bytes()), columnar.unpack(columnar.pack([t]))[0]):
        assert back.loss_mask.tolist() == [1, 1, 0, 0, 1, 1] and back.oldest_version() == 2 and back.model_tokens == 4
    old = t.to_dict()
    del old["loss_mask"]  # a record written before episodes existed: every response token is the model's
    assert Trajectory.from_dict(old).loss_mask.tolist() == [1] * 6
