"""Single-player TextArena games as environments, played with the real textarena package.

Scripted policies play GuessTheNumber-v0 (1 to 20, 10 guesses) and TowerOfHanoi-v0: binary
search on the game's hints wins and earns 1, bad guesses run out the turns for partial credit,
two formatless moves in a row lose. Also pinned: the factory's one-line errors, the seeds, new
observations only, and games that share nothing (not even the global `random`).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from rollout.envs.base import EnvStep
from rollout.envs.registry import make_env_factory
from rollout.envs.textarena_env import TextArenaEnv, TextArenaEnvs, game_reward
from rollout.tasks.base import TaskConfig, TaskSample

GUESS = "GuessTheNumber-v0"
HANOI = "TowerOfHanoi-v0"
HANOI_SOLUTION = ["[A C]", "[A B]", "[C B]", "[A C]", "[B A]", "[B C]", "[A C]"]


def factory(game: str = GUESS, **task: Any) -> TextArenaEnvs:
    cfg = TaskConfig(name="env", env=f"textarena:{game}", **{"train_size": 6, "eval_size": 3, **task})
    built = make_env_factory(cfg)
    assert isinstance(built, TextArenaEnvs)
    return built


def text(step: EnvStep) -> str:
    assert [m["role"] for m in step.observation] == ["user"]
    return step.observation[0]["content"]


async def binary_search(env: TextArenaEnv, sample: TaskSample) -> tuple[list[str], EnvStep]:
    """Guess the middle of what is left until the game ends; returns the game's messages and the last step."""
    opening = await env.reset(sample)
    seen, low, high = [opening[-1]["content"]], 1, 20
    for _ in range(10):
        guess = (low + high) // 2
        step = await env.step(f"My guess is [{guess}].")
        if step.done:
            return seen, step
        hint = text(step)
        seen.append(hint)
        low, high = (guess + 1, high) if "higher" in hint else (low, guess - 1)
    raise AssertionError("binary search did not end the game in 10 guesses")


def play(coro: Any) -> Any:
    return asyncio.run(coro)


def test_an_unknown_game_fails_with_close_names():
    with pytest.raises(ValueError, match="no game 'GuessTheNumbr-v0'.*GuessTheNumber-v0") as err:
        factory("GuessTheNumbr-v0")
    assert "\n" not in str(err.value)


def test_a_multi_player_game_is_refused():
    for game in ("TicTacToe-v0", "Poker-v0"):
        with pytest.raises(ValueError, match="multi-player.*single-player games") as err:
            factory(game)
        assert "\n" not in str(err.value)


def test_env_args_reach_the_game_and_bad_ones_fail_in_one_line():
    with pytest.raises(ValueError, match="could not build 'GuessTheNumber-v0'.*bogus") as err:
        factory(env_args={"bogus": 1})
    assert "\n" not in str(err.value)
    envs = factory(env_args={"max_turns": 4})
    opening = play(envs.make().reset(envs.samples("train")[0]))
    assert "within 4 turns" in opening[0]["content"]


def test_samples_are_seeds_deterministic_and_disjoint_between_splits():
    envs = factory(train_size=50, eval_size=20)
    train, held_out = envs.samples("train"), envs.samples("eval")
    assert len(train) == 50 and len(held_out) == 20
    assert [s.id for s in train[:2]] == ["train-0", "train-1"] and held_out[0].id == "eval-0"
    assert all(s.prompt == "" and s.answer == "" and s.chat for s in train + held_out)
    train_seeds = [s.extra_info["seed"] for s in train]
    eval_seeds = [s.extra_info["seed"] for s in held_out]
    assert len(set(train_seeds)) == 50 and not set(train_seeds) & set(eval_seeds)
    again = factory(train_size=50, eval_size=20)
    assert again.samples("train") == train and again.samples("eval") == held_out
    assert [s.extra_info["seed"] for s in factory(seed=1, train_size=50).samples("train")] != train_seeds
    assert len(envs.samples("test")) == 20


def test_binary_search_wins_with_reward_one():
    envs = factory()
    for sample in envs.samples("train")[:3]:
        env = envs.make()
        seen, last = play(binary_search(env, sample))
        assert last.done and last.reward == 1.0 and last.observation == []
        assert len(seen) <= 5  # the opening and at most four hints: 1..20 takes five guesses at most
        play(env.close())


def test_the_same_seed_plays_the_same_game():
    envs = factory()
    sample = envs.samples("eval")[1]
    assert play(binary_search(envs.make(), sample)) == play(binary_search(envs.make(), sample))


async def far_guesses(env: TextArenaEnv, sample: TaskSample) -> list[EnvStep]:
    """Guess 10, then walk away from the target from the far end, never hitting it."""
    await env.reset(sample)
    first = await env.step("[10]")
    assert not first.done, "pick a sample whose number is not 10"
    guesses = iter(range(1, 10) if "higher" in text(first) else range(20, 10, -1))
    steps = [first]
    while not steps[-1].done:
        steps.append(await env.step(f"[{next(guesses)}]"))
    return steps


def test_bad_guesses_run_out_the_turns_for_partial_credit():
    envs = factory(env_args={"max_turns": 4})
    steps = play(far_guesses(envs.make(), envs.samples("train")[0]))
    # TextArena checks the limit before it counts the turn: max_turns=4 allows five guesses
    assert len(steps) == 5 and all(not s.done for s in steps[:4]) and steps[-1].done
    # the game scores 1 - distance / 19 for the last guess (4 or 17), at least 7 away from the number
    assert 0.0 < steps[-1].reward < 0.65


def test_an_invalid_move_is_reported_and_a_second_one_in_a_row_loses():
    envs = factory()

    async def episode() -> tuple[EnvStep, EnvStep]:
        env = envs.make()
        await env.reset(envs.samples("train")[0])
        return await env.step("I have no idea"), await env.step("still no idea")

    warned, lost = play(episode())
    assert not warned.done and "invalid move" in text(warned)
    assert lost.done and lost.reward == 0.0


def test_steps_show_only_what_is_new():
    envs = factory()

    async def two_guesses() -> tuple[list[dict], EnvStep, EnvStep]:
        env = envs.make()
        opening = await env.reset(envs.samples("train")[0])
        return opening, await env.step("Let me think... [1]"), await env.step("Then [20]")

    opening, first, second = play(two_guesses())
    assert len(opening) == 1 and "playing Guess The Number" in opening[0]["content"]
    # the number is neither 1 nor 20 for this sample: each reply is just the hint, not the history again
    assert text(first) == "The target number is higher."
    assert text(second) == "The target number is lower."


def test_tower_of_hanoi_shows_each_new_board_and_the_solution_earns_one():
    envs = factory(HANOI)

    async def solve() -> tuple[list[dict], list[EnvStep]]:
        env = envs.make()
        opening = await env.reset(envs.samples("train")[0])
        return opening, [await env.step(move) for move in HANOI_SOLUTION]

    opening, steps = play(solve())
    assert "Tower of Hanoi" in opening[0]["content"] and "A: [3, 2, 1]" in opening[0]["content"]
    first = text(steps[0])
    assert first.startswith("You moved disk 1 from A to C.") and first.count("Current Board") == 1
    assert "Tower of Hanoi" not in first and "[A C]" not in first
    assert all(not s.done for s in steps[:-1]) and steps[-1].done and steps[-1].reward == 1.0


def test_envs_are_independent_and_leave_the_global_random_alone():
    envs = factory()
    a_sample, b_sample = envs.samples("train")[:2]
    alone_a = play(binary_search(envs.make(), a_sample))
    alone_b = play(binary_search(envs.make(), b_sample))

    async def side_by_side() -> list[Any]:
        return list(
            await asyncio.gather(
                binary_search(envs.make(), a_sample),
                binary_search(envs.make(), b_sample),
                binary_search(envs.make(), a_sample),
            )
        )

    random.seed(7)
    before = random.getstate()
    together = play(side_by_side())
    assert random.getstate() == before
    assert together == [alone_a, alone_b, alone_a]


def test_game_results_map_into_zero_one():
    assert [game_reward(r) for r in (None, -1, 0, 0.25, 1, 3)] == [0.0, 0.0, 0.0, 0.25, 1.0, 1.0]


def test_a_step_without_a_game_in_play_is_an_error():
    env = factory().make()
    with pytest.raises(RuntimeError, match="reset"):
        play(env.step("[5]"))
