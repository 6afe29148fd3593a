"""The rollout engine as a Ray actor: prompts in, scored and version-tagged trajectories out.

An async actor: many groups are in flight at once (vLLM batches them), and weight updates are
served while generation runs. A bad prompt (empty, over-long) is refused with a clear error
for that prompt only; the actor keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from buffer import columnar
from buffer.trajectory import Trajectory
from rollout.agent_loop import AgentLoop
from rollout.config import RolloutConfig
from rollout.engine import Engine
from rollout.engine_factory import start_engine
from rollout.records import Completion, PromptItem, RolloutResult
from rollout.rewards import RewardPool
from rollout.tasks.registry import ScoredReward, TaskConfig, TaskSample
from runtime.cores import held_cores, pin_process

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt this engine cannot take; the message says why."""


@dataclass
class RolloutStats:
    groups: int = 0
    trajectories: int = 0
    tokens: int = 0
    generate_s: float = 0.0
    prompt_errors: int = 0
    reward_errors: int = 0
    weight_updates: int = 0
    weight_bytes: int = 0
    weight_s: float = 0.0
    push_wait_s: float = 0.0
    last_error: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class EngineNotStarted(RuntimeError):
    """A call that needs the engine reached an actor without one: Ray restarted the actor after
    a crash and nobody has called `start` yet. The controller treats it as the engine being down."""


class RolloutActor:
    def __init__(self, cfg: RolloutConfig, task: TaskConfig | None = None, engine_id: str = "engine-0", buffer=None,
                 cores: list[int] | None = None):  # fmt: skip
        """`cores`: this engine's own cores; bound before vLLM starts, so its engine process and
        OpenMP threads inherit them."""
        self.cores = pin_process(cores) if cores else held_cores()
        self.cfg = cfg
        self.engine_id = engine_id
        self.task_cfg = task
        self.rewards: RewardPool | None = None
        self.agent: AgentLoop | None = None  # task.name env: multi-turn episodes
        self.buffer = buffer
        self.engine: Engine | None = None
        self.stats = RolloutStats()
        self._background: set[asyncio.Task] = set()
        self._failed: list[tuple[str, str, bool]] = []  # submitted groups that failed: (id, why, refused)
        self._counter = 0

    async def start(self) -> dict:
        """Start the engine (minutes on a big GPU model); returns what was started."""
        from transformers import AutoTokenizer

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model_path)
        started = time.perf_counter()
        if self.task_cfg is not None and self.task_cfg.name == "env":
            if self.agent is None:
                self.agent = await AgentLoop.open(self.task_cfg, self.cfg, self.tokenizer)
        elif self.task_cfg is not None and self.rewards is None:
            self.rewards = RewardPool(self.task_cfg)
        self.engine = await start_engine(self.cfg)
        return {"engine_id": self.engine_id, "backend": self.engine.name, "startup_s": time.perf_counter() - started,
                "receivers": self.engine.num_receivers, "cores": self.cores}  # fmt: skip

    # -- generation ---------------------------------------------------------------------------

    def encode(self, item: PromptItem) -> list[int]:
        ids = self.tokenizer(item.text, add_special_tokens=False)["input_ids"] if item.text else []
        if not ids:
            raise PromptError(f"prompt of group {item.group_id!r} is empty")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise PromptError(
                f"prompt of group {item.group_id!r} has {len(ids)} tokens, more than the {self.cfg.max_prompt_tokens} "
                f"allowed (rollout.max_model_len {self.cfg.max_model_len} - max_new_tokens {self.cfg.max_new_tokens})"
            )
        return ids

    async def generate(self, items: list[PromptItem], n: int | None = None) -> RolloutResult:
        """Sample n responses for each prompt, concurrently; returns the scored trajectories."""
        self._require_engine()
        started = time.perf_counter()
        result = RolloutResult()
        outcomes = await asyncio.gather(*(self._group(item, n or self.cfg.n) for item in items), return_exceptions=True)
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                result.errors[item.group_id] = f"{type(outcome).__name__}: {outcome}"
                self.stats.last_error = result.errors[item.group_id]
                self.stats.prompt_errors += isinstance(outcome, PromptError)
                if isinstance(outcome, PromptError):
                    result.refused.append(item.group_id)
                else:
                    log.error("group %s failed: %s", item.group_id, result.errors[item.group_id])
            else:
                result.trajectories.extend(outcome)
        result.seconds = time.perf_counter() - started
        return result

    async def submit(self, items: list[PromptItem], n: int | None = None) -> int:
        """Generate in the background and push each finished group to the buffer (waiting for
        room there: backpressure, not loss). Returns how many groups are now in flight."""
        if self.buffer is None:
            raise RuntimeError("submit needs the actor to be created with a buffer handle")
        self._require_engine()
        for item in items:
            task = asyncio.create_task(self._group_to_buffer(item, n or self.cfg.n))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return len(self._background)

    def _require_engine(self) -> None:
        if self.engine is None:
            raise EngineNotStarted(f"{self.engine_id} has no engine (not started, or restarted after a crash)")

    def set_buffer(self, buffer) -> None:
        self.buffer = buffer

    async def running(self) -> int:
        """Requests inside the engine right now (generate calls included, not only submits)."""
        return self.engine.running() if self.engine is not None else 0

    async def in_flight(self) -> int:
        """Groups submitted and not yet pushed; -1 when the engine is not started (a Ray
        restart of this actor brings it back without one: the controller starts it)."""
        return len(self._background) if self.engine is not None else -1

    async def poll(self) -> tuple[int, list[tuple[str, str, bool]]]:
        """What the feeder needs each round, in one call: groups in flight (-1: no engine, as
        `in_flight`) and the submitted groups that failed since the last poll, as (group id,
        reason, refused). A refused prompt never works; another failure may on a retry. The
        controller releases their admission slots and decides what to hand out again."""
        failed, self._failed = self._failed, []
        return (len(self._background) if self.engine is not None else -1), failed

    async def drain(self) -> None:
        """Wait until every submitted group is in the buffer (or reported failed)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _group_to_buffer(self, item: PromptItem, n: int) -> None:
        try:
            result = await self.generate([item], n)
            if result.trajectories:
                waited = time.perf_counter()
                await self.buffer.put_packed.remote(columnar.pack(result.trajectories), None)
                self.stats.push_wait_s += time.perf_counter() - waited
            for gid, why in result.errors.items():
                self._failed.append((gid, why, gid in result.refused))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - reported to the controller, which requeues it
            self._failed.append((item.group_id, f"{type(err).__name__}: {err}", False))

    async def _group(self, item: PromptItem, n: int) -> list[Trajectory]:
        if self.agent is not None:
            return await self._episodes(item, n)
        prompt_ids = self.encode(item)
        self._counter += 1
        started = time.perf_counter()
        completions = await self.engine.generate(prompt_ids, n, f"{self.engine_id}-{self._counter}-{item.group_id}")
        generated = time.perf_counter() - started
        rewards = await asyncio.gather(*(self._reward(item, c) for c in completions))
        trajs = [self._trajectory(item, prompt_ids, i, c, n, generated, r)
                 for i, (c, r) in enumerate(zip(completions, rewards, strict=True))]  # fmt: skip
        return self._counted(trajs, generated)

    async def _episodes(self, item: PromptItem, n: int) -> list[Trajectory]:
        self._counter += 1
        started = time.perf_counter()
        trajs = await self.agent.group(self.engine, item, n, f"{self.engine_id}-{self._counter}-{item.group_id}",
                                       self.engine_id)  # fmt: skip
        self.stats.reward_errors += sum("reward_error" in t.extra for t in trajs)  # a failed episode
        return self._counted(trajs, time.perf_counter() - started)

    def _counted(self, trajs: list[Trajectory], seconds: float) -> list[Trajectory]:
        """One group's share of the stats: its samples, the tokens the model sampled, the time."""
        self.stats.groups += 1
        self.stats.trajectories += len(trajs)
        self.stats.tokens += sum(t.model_tokens for t in trajs)
        self.stats.generate_s += seconds
        return trajs

    async def _reward(self, item: PromptItem, c: Completion) -> tuple[ScoredReward, float]:
        """The completion's reward from the worker pool (no task: 0, as for a bare engine)."""
        if self.rewards is None:
            return ScoredReward(0.0), 0.0
        started = time.perf_counter()
        text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        sample = TaskSample(item.sample_id, item.text, item.answer, data_source=item.data_source,
                            extra_info=item.extra_info)  # fmt: skip
        scored = await self.rewards.score(text, sample)
        self.stats.reward_errors += scored.error is not None
        return scored, time.perf_counter() - started

    def _trajectory(self, item: PromptItem, prompt_ids: list[int], i: int, c: Completion, n: int, gen_s: float,
                    scored: tuple[ScoredReward, float]) -> Trajectory:  # fmt: skip
        (reward, reward_error), reward_s = (scored[0].value, scored[0].error), scored[1]
        extra = {"sample_id": item.sample_id, "answer": item.answer, **item.extra}
        if item.data_source:
            extra["data_source"] = item.data_source
        if reward_error:
            extra["reward_error"] = reward_error
        return Trajectory(
            traj_id=f"{item.group_id}/{i}",
            group_id=item.group_id,
            group_size=n,
            prompt_ids=prompt_ids,
            response_ids=c.token_ids,
            behavior_logprobs=c.logprobs,
            token_versions=c.versions,
            version_start=c.version_start,
            version_end=c.version_end,
            reward=reward,
            finish_reason=c.finish_reason,
            engine_id=self.engine_id,
            timings={"generate": gen_s, "reward": reward_s},
            extra=extra,
            routed_experts=None if c.routed_experts is None else c.routed_experts.reshape(-1),
            routing_shape=(0, 0) if c.routed_experts is None else c.routed_experts.shape[1:],
        )

    # -- weights ------------------------------------------------------------------------------

    async def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, secret: str
    ) -> None:
        """Join the learner's weight group as ranks rank_offset .. rank_offset + receivers - 1,
        proving the group's secret (hex). This engine's own sockets bind to loopback when the
        group's store is on loopback (one machine), else to this node's Ray address."""
        from weightsync.transport import node_ip

        self._require_engine()
        bind = host if host.startswith("127.") else node_ip()
        await self.engine.init_weight_group(host, port, rank_offset, world_size, backend, secret, bind)

    async def receive_weights(self, plan_wire: list, version: int) -> dict:
        """Take part in one broadcast from the learner and switch to `version`."""
        self._require_engine()
        started = time.perf_counter()
        received = await self.engine.receive_weights(plan_wire, version)
        return self._updated(received, time.perf_counter() - started)

    async def load_weights(self, named: list[tuple[str, torch.Tensor]] | dict, version: int) -> dict:
        """The object-store fallback: weights passed by value (a Ray object ref resolves to them)."""
        self._require_engine()
        started = time.perf_counter()
        pairs = list(named.items()) if isinstance(named, dict) else list(named)
        await self.engine.load_weights(pairs, version)
        received = sum(t.numel() * t.element_size() for _, t in pairs)
        return self._updated(received, time.perf_counter() - started)

    def _updated(self, received: int, seconds: float) -> dict:
        self.stats.weight_updates += 1
        self.stats.weight_bytes += received
        self.stats.weight_s += seconds
        return {"version": self.engine.version, "bytes": received, "seconds": seconds}

    async def weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        return await self.engine.weights(names)

    def version(self) -> int:
        return self.engine.version

    def get_stats(self) -> RolloutStats:
        return self.stats

    async def shutdown(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()
        if self.rewards is not None:
            self.rewards.close()
            self.rewards = None
        if self.agent is not None:
            await self.agent.close()
            self.agent = None


def rollout_actor(
    cfg: RolloutConfig, task: TaskConfig | None = None, engine_id: str = "engine-0", buffer=None,
    cores: list[int] | None = None, **options,
):  # fmt: skip
    """A started-later RolloutActor handle (call `start` and wait for it before anything else)."""
    import os

    import ray

    remote = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_concurrency=1000)(RolloutActor)
    # vLLM logs every request and weight reload at INFO/WARNING: keep the driver's console for progress
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    options.setdefault("runtime_env", {"env_vars": env})
    options.setdefault("max_restarts", cfg.max_restarts)  # calls in flight at a death fail, not retried
    return remote.options(**options).remote(cfg, task, engine_id, buffer, cores)
