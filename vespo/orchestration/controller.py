"""The training recipe: build the run's components, then one loop.

    batch = source.next(step)        # whole groups from the buffer, under its admission rule
    result = learner.train(batch)    # advantages (scaled by the batch's weights), loss, update
    weights.publish(step)            # when the schedule says so
    after_step(...)                  # metrics, evaluation, checkpoint, logging

Everything else lives in a component with one job: `fleet` (engines: feeding, failures,
restarts, requeue), `sources` (async, or sync with ratio N: when prompts are handed out),
`weight_publisher` (who joins the weight group, when weights go out), `step_metrics` (what
trains, what is shown), `run_state` (where checkpoints keep the loop's state). `setup` builds
the real ones on Ray; `assemble` takes any that honour vespo.orchestration.contracts, which is
how tests run this loop with in-process fakes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import configtypes
from buffer.divergence import DivergenceEstimate
from learner import checkpoint
from learner.step_result import StepResult
from rollout.tasks.registry import make_task
from runtime.cores import bind_threads
from vespo.config.run_config import RunConfig
from vespo.orchestration import run_state
from vespo.orchestration.contracts import Buffer, Engine, EngineLost, Learner
from vespo.orchestration.fleet import EngineFleet
from vespo.orchestration.prompts import PromptStream, PromptStreamState, prompt_item
from vespo.orchestration.sources import AsyncSource, SyncSource
from vespo.orchestration.step_metrics import Screen, step_metrics
from vespo.orchestration.weight_publisher import WeightPublisher
from vespo.reporting.eval_score import score
from vespo.reporting.examples import examples
from vespo.reporting.run_logger import RunLogger
from weightsync.transport import backend_for

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    steps: int
    version: int
    wall_s: float
    checkpoint: str = ""
    wandb: str = ""
    rewards: list[float] = field(default_factory=list)  # mean training reward per step
    eval_rewards: list[tuple[int, float]] = field(default_factory=list)
    learner_idle_fraction: float = 0.0  # share of wall time the learner waited for data
    max_batch_staleness: int = 0
    clock: dict[str, float] = field(default_factory=dict)  # seconds: generate (sync), wait, train, sync
    stopped: str | None = None  # why the run ended before train.steps (e.g. "SIGTERM"), else None
    trained_groups: list[str] = field(default_factory=list)  # group ids in the order they were trained
    engine_restarts: int = 0  # engine actors Ray restarted during the run (each recovered)
    requeued_groups: list[str] = field(default_factory=list)  # prompts a dead engine held, handed out again
    cores: dict[str, list[int]] = field(default_factory=dict)  # the CPU cores each engine / learner rank ran on
    # at the end of each step: seconds since the loop started ("wall") and the clock then; a
    # steady-state rate leaves out the first steps, which pay one-off compilation and warm-up
    step_clocks: list[dict[str, float]] = field(default_factory=list)

    @property
    def learner_busy_fraction(self) -> float:
        return self.clock.get("train", 0.0) / max(self.wall_s, 1e-9)


class LearnerFailed(RuntimeError):
    """A learner rank or another actor the loop depends on died; the message says how to resume."""


class Controller:
    def __init__(self, cfg: RunConfig, logger: RunLogger | None = None):
        self.cfg, self.logger = cfg, logger
        self.checkpoint_root = cfg.output / "checkpoints"
        self.stop_reason: str | None = None  # set (e.g. by a signal) to stop after the current step
        self._stop = threading.Event()  # set when the run ends: waits and the feeder stop
        self.fatal: tuple[type[BaseException], ...] = ()  # errors that mean an actor of the run died
        self.tokenizer, self.pad_id = None, 0  # set by setup (fakes need neither)
        self._driver_cores: set[int] | None = None  # what this process held before setup pinned it
        self.source = self.fleet = self.learner = self.buffer = None  # set by assemble
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.step = 0
        self.rewards: list[float] = []
        self.eval_rewards: list[tuple[int, float]] = []
        self.eval_examples: list = []  # decoded samples of the last evaluation
        self.trained_groups: list[str] = []
        self.max_staleness_seen, self.train_s, self.skipped_updates, self.refused_seen = 0, 0.0, 0, 0
        self._last_tokens: tuple[int, float] | None = None
        self.step_clocks: list[dict[str, float]] = []
        self._loop_started = time.perf_counter()
        self.screen = Screen(self.cfg.train.groups_per_step * self.cfg.rollout.n)
        # buffer.divergence_budget: the learner's KL-by-lag metrics, smoothed, set the buffer's cap
        self.divergence = DivergenceEstimate() if self.cfg.buffer.divergence_budget is not None else None
        self._cap_sent: int | None = None  # the cap last given to the buffer; None: none given yet

    def request_stop(self, reason: str) -> None:
        """Finish the current step, checkpoint, shut down: what SIGTERM and Ctrl-C ask for."""
        self.stop_reason = reason

    # -- set-up ---------------------------------------------------------------------------

    def setup(self, resume: str | Path | None = None) -> None:
        """Start everything on Ray; with `resume` (a checkpoint step directory or a checkpoints
        root: its newest complete step), continue that run exactly where it stopped."""
        import ray
        from transformers import AutoTokenizer

        from vespo.models import resolve_model
        from vespo.orchestration import ray_components

        cfg = self.cfg
        self.fatal = (ray.exceptions.RayActorError,)
        found = checkpoint.latest(resume) if resume is not None else None
        if found is not None:
            self.checkpoint_root = checkpoint.checkpoint_root(found)  # a resumed copy writes into the copy
        cfg.rollout.model_path = cfg.learner.model_path = resolve_model(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.learner.model_path)
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        engines, buffer, cores = ray_components.start_actors(cfg, str(found / "buffer") if found else None)
        if cores.driver:  # off the learner's cores until shutdown (a test's process gets them back)
            self._driver_cores = bind_threads(cores.driver)
        starting = [e.start() for e in engines]  # engines and learner ranks start at the same time
        learner = ray_components.start_learner(cfg, cores.ranks)
        self.assemble(engines, buffer, learner, self._render, [p.result() for p in starting], found)

    def _render(self, gid: str, sample) -> object:
        return prompt_item(gid, sample, self.tokenizer, self.cfg.task.system_prompt)

    def assemble(self, engines: list[Engine], buffer: Buffer, learner: Learner, make_item, started: list[dict],
                 resume_from: Path | None = None, weights: WeightPublisher | None = None) -> None:  # fmt: skip
        """Wire started components into the run (`started`: each engine's start() result); a new
        weight group is formed unless `weights` is one the same engines and learner already have."""
        cfg = self.cfg
        self.engines, self.buffer, self.learner = engines, buffer, learner
        self.task = make_task(cfg.task)
        self.prompts = PromptStream(self.task.samples("train"), seed=cfg.task.seed)
        self.eval_samples = self.task.samples("eval")[: cfg.train.eval_prompts]
        self.fleet = EngineFleet(engines, buffer, self.prompts, make_item, cfg.train.group_retries,
                                 cfg.train.engine_restart_timeout_s, cfg.rollout.max_restarts)  # fmt: skip
        self.fleet.started(started, quiet=weights is not None)  # a new run on engines already up
        if weights is None:
            backend = backend_for("cuda" if cfg.learner.num_gpus_per_worker > 0 else "cpu")
            weights = WeightPublisher(learner, self.fleet, backend, cfg.train.weight_bucket_mb << 20)
            weights.form()
        self.weights, weights.fleet = weights, self.fleet
        self._stop = threading.Event()
        source = SyncSource if cfg.train.mode == "sync" else AsyncSource
        self.source = source(self.fleet, self.weights, cfg.train, self.stopping)
        if resume_from is not None:
            self.restore(resume_from)

    @property
    def engine_restarts(self) -> int:
        return self.fleet.restarts

    @property
    def version(self) -> int:
        return self.weights.version

    def stopping(self) -> bool:
        return self.stop_reason is not None or self._stop.is_set()

    def begin_run(self, cfg: RunConfig, logger: RunLogger | None = None) -> None:
        """Start another training run on the actors already up: the learner starts over from the
        model (fresh optimizer, cfg's objective, lr and seed), the engines get those weights, a
        new buffer takes cfg.buffer, the prompt stream starts from cfg.task.seed. What cannot
        change without new actors (model, task, engines, learner layout) must equal the running
        config. A sweep of many short runs pays start-up once this way. The divergence estimate
        starts over too (_reset_counters), and the new buffer at max_staleness: the last run's
        drift says nothing of the next one's."""
        from vespo.orchestration import ray_components

        old = self.cfg
        cfg.rollout.model_path = cfg.learner.model_path = old.learner.model_path
        fixed = {
            "model": (cfg.model, old.model),
            "task (other than its seed)": (dataclasses.replace(cfg.task, seed=old.task.seed), old.task),
            "rollout": (cfg.rollout, old.rollout),
            "train.num_engines": (cfg.train.num_engines, old.train.num_engines),
            "learner.world_size": (cfg.learner.world_size, old.learner.world_size),
            "learner.zero_stage": (cfg.learner.zero_stage, old.learner.zero_stage),
        }
        changed = [name for name, (new, was) in fixed.items() if new != was]
        if changed:
            raise ValueError(f"begin_run keeps the actors, so these must not change: {', '.join(changed)}")
        self._stop.set()
        for e in self.engines:
            e.drain()  # nothing of the last run still on its way
        buffer = ray_components.new_buffer(cfg)
        for e in self.engines:
            e.set_buffer(buffer)
        self.buffer.shutdown()
        self.learner.rebuild(cfg.learner)
        self.cfg, self.logger, self.stop_reason = cfg, logger, None
        self._reset_counters()
        weights, weights.version, weights.seconds = self.weights, 0, 0.0
        self.assemble(self.engines, buffer, self.learner, self.fleet.make_item, self.fleet.infos, weights=weights)
        self.weights.publish(0)

    # -- the loop -------------------------------------------------------------------------

    def run(self, checkpoint: bool = True) -> RunSummary:
        """Train to cfg.train.steps (or a stop request); `checkpoint=False` skips the final
        checkpoint (sweeps that only want the metrics)."""
        cfg, started, path = self.cfg.train, time.perf_counter(), ""
        self._loop_started = started
        self.source.start()
        try:
            while self.step < cfg.steps and self.stop_reason is None:
                batch = self.source.next(self.step)
                if batch is None:
                    break  # stopped while waiting
                screened = self.screen(batch, self.step)
                self._settle(batch)
                if screened.batch is None:
                    continue  # nothing in it can train (logged)
                t0 = time.perf_counter()
                result = self.learner.train(screened.batch, self.pad_id, cfg.recompute_old_logprobs)
                self.train_s += time.perf_counter() - t0
                self.step += 1
                if self.source.publish_due(self.step):
                    self.weights.publish(self.step)
                self.after_step(screened, result)
            self.source.close()  # nothing more handed out before the state is recorded
            path = str(self.checkpoint()) if checkpoint else ""
        except (*self.fatal, EngineLost) as err:
            raise LearnerFailed(self._failure_message(err)) from err
        finally:
            self.source.close()
            self._stop.set()
        return self._summary(time.perf_counter() - started, path)

    def _settle(self, batch) -> None:
        groups = list(dict.fromkeys(t.group_id for t in batch.trajectories))
        self.fleet.forget_delivered()  # the trained groups among them
        self.trained_groups += groups

    def after_step(self, screened, result: StepResult) -> None:
        """Metrics of the step, then evaluation, checkpoint and logging when they are due."""
        cfg, fleet = self.cfg.train, self.fleet
        batch, metrics = screened.batch, result.dashboard()
        if metrics.get("actor/step_skipped"):
            self.skipped_updates += 1
            log.error("step %d: the learner skipped the update: non-finite gradient (loss %s); weights unchanged",
                      self.step, metrics.get("actor/loss"))  # fmt: skip
        metrics.update(self._apply_divergence_budget(result.kl_by_lag))
        metrics.update(step_metrics(screened, self.screen, self.weights.version, self.step))
        metrics.update(self.buffer.metrics())
        self.rewards.append(metrics["reward/mean"])
        self.max_staleness_seen = max(self.max_staleness_seen, max(batch.staleness, default=0))
        stats = fleet.stats()
        tokens, now = sum(s.tokens for s in stats), time.perf_counter()
        if self._last_tokens is not None:
            metrics["perf/gen_tokens_per_s"] = (tokens - self._last_tokens[0]) / max(now - self._last_tokens[1], 1e-9)
        self._last_tokens = (tokens, now)
        metrics["perf/gen_engine_s_total"] = sum(s.generate_s for s in stats)
        total, latest = self.learner.refused()
        for who in latest[len(latest) - min(total - self.refused_seen, len(latest)) :]:
            log.warning("refused a connection to the learner's stores: %s did not prove the run's secret", who)
        self.refused_seen = total
        faults = {"skipped_updates": self.skipped_updates, "engine_restarts": fleet.restarts,
                  "requeued_groups": len(fleet.requeued), "refused_prompts": fleet.refused_prompts,
                  "retried_groups": fleet.retried_groups, "dropped_groups": fleet.dropped_groups,
                  "refused_connections": total}  # fmt: skip
        metrics.update({f"faults/{k}": float(v) for k, v in faults.items()})
        clock = self.clock()
        metrics.update({f"time/{k}_s": v for k, v in clock.items()}, **{"sync/bytes": float(self.weights.bytes)})
        self.step_clocks.append({"wall": time.perf_counter() - self._loop_started, **clock})
        shown = []
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            metrics.update(self.evaluate())
            shown = self.eval_examples
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
            self.checkpoint()
        if self.logger is not None:
            self.logger.log(metrics, self.step, {"staleness/histogram": batch.staleness})
            self.logger.log_examples("eval/samples", self.step, shown)

    def _apply_divergence_budget(self, kl_by_lag: dict[int, float]) -> dict[str, float]:
        """Feed the step's KL by lag to the estimate and give the buffer the cap the budget allows
        (buffer.divergence), only when it changed: one call to the buffer actor per change, not
        per step. With no budget, nothing: the version cap alone holds."""
        budget = self.cfg.buffer.divergence_budget
        if self.divergence is None or budget is None:
            return {}
        self.divergence.observe(kl_by_lag)
        cap = self.divergence.cap(budget, self.cfg.buffer.max_staleness, last=self._cap_sent)
        if cap != self._cap_sent:
            self.buffer.set_staleness_cap(cap)
            self._cap_sent = cap
        out = {"divergence/staleness_cap": float(cap)}
        at_cap = self.divergence.envelope(cap)
        if at_cap is not None:  # nothing measured yet at or below the cap: no estimate to show
            out["divergence/kl_estimate_at_cap"] = at_cap
        return out

    def clock(self) -> dict[str, float]:
        waited = {"generate": 0.0, "wait": 0.0, self.source.clock: self.source.seconds}
        return {**waited, "train": self.train_s, "sync": self.weights.seconds}

    def evaluate(self) -> dict[str, float]:
        """Held-out reward: one sample per prompt at the rollout temperature, on the first engine."""
        items = [self.fleet.make_item(f"eval-{self.step}-{s.id}", s) for s in self.eval_samples]
        result = self.engines[0].generate(items, 1)
        scored = score(result.trajectories)
        self.eval_rewards.append((self.step, scored.mean_reward))
        shown = self.cfg.train.eval_log_samples
        self.eval_examples = examples(result.trajectories, self.tokenizer, shown) if self.tokenizer is not None else []
        episodes = {f"eval/{k}": v for k, v in scored.episodes.items()}
        return {"eval/reward": scored.mean_reward, "eval/accuracy": scored.accuracy, **episodes}

    # -- checkpoint and resume (run_state: where and in which order) ------------------------

    def checkpoint(self) -> Path:
        state = {"step": self.step, "version": self.weights.version, "config": configtypes.to_dict(self.cfg)}

        def snapshot_buffer(path: Path) -> None:
            # with it, the prompt stream's position and the prompts to hand out again, taken together
            state.update(self.fleet.resume_point(lambda: self.buffer.snapshot_seen_groups(path)))

        return run_state.save(self.learner, self.checkpoint_root, self.step, self.weights.version,
                              self.cfg.train.keep_checkpoints, snapshot_buffer, state)  # fmt: skip

    def restore(self, found: Path) -> None:
        """Continue from checkpoint `found`: the learner's ranks, the step, the prompt stream, the
        prompts to hand out again; then the engines get the restored weights. The buffer was
        created from the checkpoint's snapshot already."""
        state = run_state.load(self.learner, found)
        self.step = state["step"]
        position = PromptStreamState(**state["prompts"])
        self.prompts = PromptStream(self.task.samples("train"), self.cfg.task.seed, position)
        self.fleet.prompts = self.prompts
        requeue = [(gid, self.prompts.by_id[sid]) for gid, sid in state.get("requeue", [])]
        self.prompts.requeue(requeue)
        # the snapshot's admission count still holds the in-flight ones: they are admitted again
        self.buffer.abandon(len(requeue) - state.get("requeue_abandoned", 0))
        self.weights.publish(self.step)  # the engines started from the base model: give them the restored weights
        log.info("resumed from %s: step %d, %d group(s) in the buffer snapshot, %d in-flight prompt(s) requeued",
                 found, self.step, self.buffer.metrics().get("buffer/ready_groups", 0), len(requeue))  # fmt: skip

    # -- the end --------------------------------------------------------------------------

    def _summary(self, wall: float, path: str) -> RunSummary:
        clock = self.clock()
        return RunSummary(
            steps=self.step, version=self.weights.version, wall_s=wall, checkpoint=path,
            wandb=self.logger.location if self.logger else "", rewards=self.rewards, eval_rewards=self.eval_rewards,
            learner_idle_fraction=clock["wait"] / max(wall, 1e-9), max_batch_staleness=self.max_staleness_seen,
            clock=clock, stopped=self.stop_reason, trained_groups=self.trained_groups,
            engine_restarts=self.fleet.restarts, requeued_groups=self.fleet.requeued, cores=self._cores(),
            step_clocks=self.step_clocks,
        )  # fmt: skip

    def _cores(self) -> dict[str, list[int]]:
        engines = {info["engine_id"]: info["cores"] for info in self.fleet.infos if "cores" in info}
        ranks = {f"learner-{r}": c for r, c in enumerate(getattr(self.learner, "cores", []))}
        return engines | ranks

    def _failure_message(self, err: Exception) -> str:
        root = self.checkpoint_root
        try:
            last = str(checkpoint.latest(root, verify=False))
        except (checkpoint.CheckpointError, OSError):
            last = None
        how = (
            f"the last checkpoint is {last}; continue with: vespo train --resume {root}"
            if last
            else "no checkpoint was written yet (set train.checkpoint_every to bound the loss); start again"
        )
        return f"an actor of the run died at step {self.step} ({type(err).__name__}: {err}); {how}"

    def shutdown(self) -> None:
        if self.source is not None:
            self.source.close()
        for part in (self.fleet, self.learner, self.buffer):
            if part is not None:
                part.shutdown()
        if self._driver_cores is not None:
            bind_threads(self._driver_cores)
            self._driver_cores = None
