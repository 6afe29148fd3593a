"""Rewards scored in worker processes, off the engine's event loop, with a per-sample timeout.

Why processes: reward code is the user's (or math-verify, whose parsing can take seconds on
an adversarial response). In a worker process it cannot block the engine's event loop, a
hung call can be stopped (the worker is killed and replaced), and a crash (segfault,
`os._exit`, SystemExit) takes down only that worker. Each worker builds the reward once from
the task config (`make_reward`: no data is read). `pebble` supplies the pool: per-task
timeouts that kill the worker, and crash detection, which `concurrent.futures` lacks.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout

from rollout.tasks.registry import RewardFn, ScoredReward, TaskConfig, TaskSample, make_reward, score

_reward: RewardFn | None = None
_build_error: str | None = None


def _init_worker(cfg: TaskConfig) -> None:
    global _reward, _build_error
    try:
        _reward = make_reward(cfg)
    except BaseException as err:  # reported per sample: a worker that dies here would be restarted forever
        _build_error = f"reward could not be built: {type(err).__name__}: {err}"


def _score(response: str, sample: TaskSample) -> ScoredReward:
    if _reward is None:
        return ScoredReward(0.0, _build_error or "reward worker not initialised")
    return score(_reward, response, sample)


class RewardPool:
    def __init__(self, cfg: TaskConfig):
        from pebble import ProcessPool

        self.timeout_s = cfg.reward_timeout_s
        # spawn, not fork: the engine process runs threads (Ray, vLLM) that a fork would copy mid-state
        self._pool = ProcessPool(
            max_workers=cfg.reward_workers,
            initializer=_init_worker,
            initargs=(cfg,),
            context=multiprocessing.get_context("spawn"),
        )

    async def score(self, response: str, sample: TaskSample) -> ScoredReward:
        """The sample's reward, or the reason it has none (raised, timed out, worker died)."""
        from pebble import ProcessExpired

        future = self._pool.schedule(_score, args=(response, sample), timeout=self.timeout_s)
        try:
            return await asyncio.wrap_future(future)
        except FutureTimeout:
            return ScoredReward(0.0, f"reward timed out after {self.timeout_s:g}s (task.reward_timeout_s)")
        except ProcessExpired as err:
            return ScoredReward(0.0, f"reward process died (exit code {err.exitcode})")
        except Exception as err:  # e.g. a response or sample that cannot be pickled
            return ScoredReward(0.0, f"reward could not run: {type(err).__name__}: {err}")

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
