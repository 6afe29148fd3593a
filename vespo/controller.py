"""The controller: places engines, buffer and learner on Ray and runs training.

async mode: engines generate continuously (a feeder thread keeps each one supplied with
prompts, asking the buffer's admission rule first so nothing is started that would be too
stale to train on); the learner takes a batch as soon as enough fresh whole groups are in
the buffer and broadcasts weights every `sync_every` steps, with partial rollout if enabled.
sync mode: generate staleness_ratio * groups_per_step groups with the current weights, make
staleness_ratio sequential updates on them, broadcast, repeat (the paper's "N").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from buffer.actor import buffer_actor, unpack_batch
from buffer.trajectory import Trajectory
from learner import checkpoint
from learner.group import LearnerGroup
from rollout.actor import EngineNotStarted, rollout_actor
from rollout.records import PromptItem
from rollout.tasks.registry import TaskSample, make_task
from vespo import typed_config
from vespo.examples import examples
from vespo.models import resolve_model
from vespo.placement import PlacementError, cluster_from_ray, demand_of, plan, role_options
from vespo.prompts import PromptStream, PromptStreamState, prompt_item
from vespo.reward_errors import RewardErrors
from vespo.run_config import RunConfig
from vespo.run_logger import RunLogger

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    steps: int
    version: int
    wall_s: float
    checkpoint: str
    wandb: str
    rewards: list[float] = field(default_factory=list)  # mean training reward per step
    eval_rewards: list[tuple[int, float]] = field(default_factory=list)
    learner_idle_fraction: float = 0.0  # share of wall time the learner waited for data
    max_batch_staleness: int = 0
    clock: dict[str, float] = field(default_factory=dict)  # seconds: generate (sync), wait, train, sync
    stopped: str | None = None  # why the run ended before train.steps (e.g. "SIGTERM"), else None
    trained_groups: list[str] = field(default_factory=list)  # group ids in the order they were trained
    engine_restarts: int = 0  # engine actors Ray restarted during the run (each recovered)
    requeued_groups: list[str] = field(default_factory=list)  # prompts a dead engine held, handed out again

    @property
    def learner_busy_fraction(self) -> float:
        return self.clock.get("train", 0.0) / max(self.wall_s, 1e-9)


class Controller:
    def __init__(self, cfg: RunConfig, logger: RunLogger | None = None):
        self.cfg = cfg
        self.logger = logger
        self.step = 0
        self.version = 0  # the engines' weights: the learner step they were broadcast at
        self._stop = threading.Event()
        self._feeder_error: BaseException | None = None
        self._clock = {"generate": 0.0, "wait": 0.0, "train": 0.0, "sync": 0.0}
        self._submitted: dict[str, str] = {}  # group id -> sample id: handed to an engine, not yet trained
        self._submitted_lock = threading.Lock()
        self.stop_reason: str | None = None  # set (e.g. by a signal) to stop after the current step
        self.resumed_from: Path | None = None
        self.trained_groups: list[str] = []
        # engine faults: which engine each handed-out group went to, engines known dead, and the
        # lock that keeps the feeder from submitting to an engine while it is being recovered
        self._engine_of: dict[str, int] = {}
        self._dead: set[int] = set()
        self._engines_lock = threading.Lock()
        self.engine_restarts = 0
        self.requeued_groups: list[str] = []
        self.reward_errors = RewardErrors(cfg.train.groups_per_step * cfg.rollout.n)
        self.eval_examples: list = []  # decoded samples of the last evaluation
        self._reset_failures()
        self.checkpoint_root = cfg.output / "checkpoints"

    def _reset_failures(self) -> None:
        """Groups that failed inside a live engine: retries per group, and what was given up."""
        self._retries: dict[str, int] = {}
        self.refused_prompts = 0  # prompts an engine refused (too long, empty): never retried
        self.dropped_groups = 0  # groups that failed group_retries + 1 times
        self.retried_groups = 0
        self._refused_seen = 0  # connections to the learner's stores that failed the proof, already logged

    def request_stop(self, reason: str) -> None:
        """Finish the current step, checkpoint, shut down: what SIGTERM and Ctrl-C ask for."""
        self.stop_reason = reason

    # -- set-up ---------------------------------------------------------------------------

    def setup(self, resume: str | Path | None = None) -> None:
        """Start everything; with `resume` (a checkpoint step directory or a checkpoints root, its
        newest complete step), continue that run: learner, versions, buffer, prompt stream."""
        cfg = self.cfg
        found = checkpoint.latest(resume) if resume is not None else None
        if found is not None:
            self.checkpoint_root = checkpoint.checkpoint_root(found)  # a resumed copy writes into the copy
        _init_ray(cfg)
        check_resources(cfg)
        model_path = resolve_model(cfg.model)
        cfg.rollout.model_path = cfg.learner.model_path = model_path
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.task = make_task(cfg.task)
        self.prompts = PromptStream(self.task.samples("train"), seed=cfg.task.seed)
        self._by_id = {s.id: s for s in self.prompts.samples}
        self.eval_samples = self.task.samples("eval")[: cfg.train.eval_prompts]

        self.buffer = buffer_actor(cfg.buffer, restore_from=str(found / "buffer") if found else None)
        resources = ray.cluster_resources()
        self.engines = [
            rollout_actor(cfg.rollout, cfg.task, f"engine-{i}", self.buffer, **role_options(resources, "rollout"))
            for i in range(cfg.train.num_engines)
        ]
        starting = [e.start.remote() for e in self.engines]
        self.learner = LearnerGroup(cfg.learner, role_options(resources, "learner").get("resources"))
        infos = ray.get(starting)
        for info in infos:
            log.info("%s: %s engine up in %.0fs", info["engine_id"], info["backend"], info["startup_s"])
        self._receivers = [info["receivers"] for info in infos]
        self._form_weight_group()
        self.plan = self.learner.weight_plan()
        if found is not None:
            self._resume(found)

    def _form_weight_group(self) -> None:
        """(Re)build the learner -> engines weight group: at start, and after an engine restart
        (a group has a fixed membership, so a restarted engine means a new group for all)."""
        receivers = self._receivers
        host, port, secret = self.learner.open_weight_sync(sum(receivers), self.cfg.train.weight_bucket_mb << 20)
        log.info("weight group: rank 0 at %s:%d, %d receiver(s); members must prove the group's secret",
                 host, port, sum(receivers))  # fmt: skip
        offsets = np.cumsum([1, *receivers[:-1]]).tolist()
        joins = [e.init_weight_group.remote(host, port, off, sum(receivers) + 1, _backend(self.cfg), secret)
                 for e, off in zip(self.engines, offsets, strict=True)]  # fmt: skip
        ray.get([self.learner.connect_weight_sync(), *joins])

    def begin_run(self, cfg: RunConfig, logger: RunLogger | None = None) -> None:
        """Start another training run on the actors already up: the learner starts over from
        the model (fresh optimizer, cfg's objective, lr and seed), the engines get those
        weights, a new buffer takes cfg.buffer, the prompt stream starts from cfg.task.seed.
        What cannot change without new actors (model, task, engines, learner layout) must
        equal the running config. A sweep of many short runs pays start-up once this way."""
        old = self.cfg
        fixed = {
            "model": (cfg.model, old.model),
            "task (other than its seed)": (dataclasses.replace(cfg.task, seed=old.task.seed), old.task),
            "rollout": (cfg.rollout, old.rollout),
            "train.num_engines": (cfg.train.num_engines, old.train.num_engines),
            "learner.world_size": (cfg.learner.world_size, old.learner.world_size),
            "learner.zero_stage": (cfg.learner.zero_stage, old.learner.zero_stage),
        }
        changed = [name for name, (new, was) in fixed.items() if new != was and name != "rollout"]
        cfg.rollout.model_path = cfg.learner.model_path = old.learner.model_path
        if cfg.rollout != old.rollout:
            changed.append("rollout")
        if changed:
            raise ValueError(f"begin_run keeps the actors, so these must not change: {', '.join(changed)}")
        self._stop.set()
        ray.get([e.drain.remote() for e in self.engines])  # nothing of the last run still on its way
        buffer, self.buffer = self.buffer, buffer_actor(cfg.buffer)
        ray.get([e.set_buffer.remote(self.buffer) for e in self.engines])
        ray.kill(buffer)
        self.learner.rebuild(cfg.learner)
        self.cfg, self.logger = cfg, logger
        self.step = self.version = 0
        self._stop = threading.Event()
        self._feeder_error = None
        self._clock = dict.fromkeys(self._clock, 0.0)
        self._submitted = {}
        self._skipped_nonfinite = self._skipped_updates = 0
        self._last = None
        self.stop_reason, self.resumed_from, self.trained_groups = None, None, []
        self._engine_of, self._dead, self.engine_restarts, self.requeued_groups = {}, set(), 0, []
        self.reward_errors = RewardErrors(cfg.train.groups_per_step * cfg.rollout.n)
        self.eval_examples: list = []  # decoded samples of the last evaluation
        self._reset_failures()
        self.task = make_task(cfg.task)
        self.prompts = PromptStream(self.task.samples("train"), seed=cfg.task.seed)
        self._by_id = {s.id: s for s in self.prompts.samples}
        self.eval_samples = self.task.samples("eval")[: cfg.train.eval_prompts]
        self._sync()

    def _resume(self, found: Path) -> None:
        state = json.loads((found / "controller" / "state.json").read_text())
        meta = self.learner.load_checkpoint(found)
        if meta.step != state["step"]:
            raise checkpoint.CheckpointError(f"{found}: learner step {meta.step} != controller step {state['step']}")
        self.step, self.version = state["step"], state["version"]
        samples = self.task.samples("train")
        self.prompts = PromptStream(samples, self.cfg.task.seed, PromptStreamState(**state["prompts"]))
        by_id = {s.id: s for s in samples}
        requeue = [(gid, by_id[sid]) for gid, sid in state.get("requeue", [])]
        self.prompts.requeue(requeue)
        # the snapshot's admission count still holds the in-flight ones: they are admitted again
        self.buffer.abandon.remote(len(requeue) - state.get("requeue_abandoned", 0))
        self._sync()  # the engines started from the base model: give them the restored weights
        self.resumed_from = found
        log.info(
            "resumed from %s: step %d, %d group(s) in the buffer snapshot, %d in-flight prompt(s) requeued",
            found, self.step, ray.get(self.buffer.metrics.remote()).get("buffer/ready_groups", 0),
            len(self.prompts.requeued),
        )  # fmt: skip

    def _handed_out(self, gid: str, sample: TaskSample, engine: int) -> PromptItem:
        with self._submitted_lock:
            self._submitted[gid] = sample.id
            self._engine_of[gid] = engine
        return self.item(gid, sample)

    def item(self, gid: str, sample: TaskSample) -> PromptItem:
        return prompt_item(gid, sample, self.tokenizer, self.cfg.task.system_prompt)

    # -- the loops ------------------------------------------------------------------------

    def run(self, checkpoint: bool = True) -> RunSummary:
        """Train to cfg.train.steps (or a stop request); `checkpoint=False` skips the final
        checkpoint (sweeps that only want the metrics)."""
        started = time.perf_counter()
        self.rewards: list[float] = []
        self.eval_rewards: list[tuple[int, float]] = []
        self.max_staleness_seen = 0
        try:
            if self.cfg.train.mode == "async":
                self._run_async()
            else:
                self._run_sync()
            self._stop.set()  # the feeder stops handing out prompts before the state is recorded
            ckpt = self.checkpoint() if checkpoint else ""
        except (ray.exceptions.RayActorError, EngineFailed) as err:
            raise LearnerFailed(self._failure_message(err)) from err
        finally:
            self._stop.set()
        wall = time.perf_counter() - started
        return RunSummary(
            self.step, self.version, wall, str(ckpt), self.logger.location if self.logger else "", self.rewards,
            self.eval_rewards, self._clock["wait"] / max(wall, 1e-9), self.max_staleness_seen, dict(self._clock),
            self.stop_reason, self.trained_groups, self.engine_restarts, self.requeued_groups,
        )  # fmt: skip

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

    def _run_async(self) -> None:
        cfg = self.cfg.train
        feeder = threading.Thread(target=self._feed, name="vespo-feeder", daemon=True)
        feeder.start()
        while self.step < cfg.steps and self.stop_reason is None:
            t0 = time.perf_counter()
            payload = None
            while payload is None and self.stop_reason is None:  # a stop ends the wait within a second
                if self._dead:
                    self._recover_engines()
                    t0 = time.perf_counter()  # the batch wait starts again: recovery is not a stall
                payload = ray.get(self.buffer.get_batch_packed.remote(cfg.groups_per_step, self.step, 1.0))
                if isinstance(self._feeder_error, EngineFailed):
                    raise self._feeder_error
                if self._feeder_error is not None:
                    raise RuntimeError("the prompt feeder failed") from self._feeder_error
                if payload is None and time.perf_counter() - t0 > cfg.batch_timeout_s:
                    raise TimeoutError(f"no batch of {cfg.groups_per_step} fresh groups in {cfg.batch_timeout_s}s")
            self._clock["wait"] += time.perf_counter() - t0
            if payload is None:
                break
            batch = unpack_batch(payload)
            if not self._train(batch.trajectories, batch.staleness, batch.weights):
                continue
            if self.step % cfg.sync_every == 0:
                self._sync()
            self._after_step()
        self._stop.set()
        feeder.join(timeout=10)

    def _feed(self) -> None:
        """Keep every engine supplied, within the admission rule (never more than max_staleness
        versions ahead of the learner)."""
        cfg = self.cfg.train
        try:
            while not self._stop.is_set():
                fed = 0
                for i, engine in enumerate(self.engines):
                    with self._engines_lock:  # recovery requeues engine i's prompts under this lock
                        if i in self._dead:
                            continue
                        try:
                            count, failed = ray.get(engine.poll.remote())
                        except ENGINE_DOWN as err:
                            self._mark_dead(i, err)
                            continue
                        if failed:
                            self._failed_groups(failed, release_admission=True)
                        if count < 0:  # restarted by Ray, not started yet
                            self._mark_dead(i, None)
                            continue
                        want = cfg.max_inflight_groups - count
                        items = []
                        while want > 0 and ray.get(self.buffer.may_start.remote(self.step, 1)):
                            items.append(self._handed_out(*self.prompts.next(), i))
                            want -= 1
                        if items:
                            # fire and forget: if the engine dies with them, recovery requeues them
                            engine.submit.remote(items)
                            fed += len(items)
                if not fed:
                    time.sleep(0.05)
        except BaseException as err:  # surfaced by the learner loop
            self._feeder_error = err

    def _run_sync(self) -> None:
        cfg = self.cfg.train
        while self.step < cfg.steps and self.stop_reason is None:
            t0 = time.perf_counter()
            prompts = self.prompts.take(cfg.groups_per_step * cfg.staleness_ratio)
            k = len(self.engines)
            shares = [[self._handed_out(*p, i) for p in prompts[i::k]] for i in range(k)]
            results = self._generate_shares(shares)
            self._clock["generate"] += time.perf_counter() - t0
            if results is None:  # stopped while generating: the prompts are requeued by the checkpoint
                break
            groups: dict[str, list[Trajectory]] = {}
            for r in results:
                self._failed_groups([(g, why, g in r.refused) for g, why in r.errors.items()], release_admission=False)
                for t in r.trajectories:
                    groups.setdefault(t.group_id, []).append(t)
            order = list(groups)
            for k in range(cfg.staleness_ratio):
                if self.step >= cfg.steps:
                    break
                # a stop mid-batch still trains the rest of it: its groups are in no buffer to resume from
                chunk = [
                    t for gid in order[k * cfg.groups_per_step : (k + 1) * cfg.groups_per_step] for t in groups[gid]
                ]
                if not chunk:
                    continue
                if self._train(chunk, [t.staleness(self.step) for t in chunk]):
                    self._after_step()
            self._sync()

    def _failed_groups(self, failed: list[tuple[str, str, bool]], release_admission: bool) -> None:
        """Groups that failed inside a live engine, as (group id, reason, refused). A refused
        prompt (too long, empty) is dropped at once; any other failure is handed out again, up
        to train.group_retries times, then dropped; both are counted (faults/*). In async mode
        each frees its admission slot, or enough of them would stop prompt feeding for good."""
        again, limit, released = [], self.cfg.train.group_retries, 0
        for gid, why, refused in failed:
            with self._submitted_lock:
                sample_id = self._submitted.pop(gid, None)
                self._engine_of.pop(gid, None)
            if sample_id is None:
                continue  # already accounted for (an engine recovery requeued it)
            released += 1
            tries = self._retries.get(gid, 0)
            if refused:
                self.refused_prompts += 1
                if self.refused_prompts <= 3 or self.refused_prompts % 100 == 0:
                    log.warning("prompt refused (%d so far, never retried): %s", self.refused_prompts, why)
            elif tries >= limit:
                self.dropped_groups += 1
                self._retries.pop(gid, None)
                log.error("group %s dropped after %d attempt(s): %s", gid, tries + 1, why)
            else:
                self._retries[gid] = tries + 1
                self.retried_groups += 1
                again.append((gid, self._by_id[sample_id]))
                log.warning("group %s failed in its engine (%s); handing it out again (retry %d of %d)",
                            gid, why, tries + 1, limit)  # fmt: skip
        if release_admission and released:
            self.buffer.abandon.remote(released)
        self.prompts.requeue(again)

    # -- one step -------------------------------------------------------------------------

    def _train(self, trajs: list[Trajectory], staleness: list[int], weights: list[float] | None = None) -> bool:
        """One learner step on these samples, each scaled by its weight (the buffer's, in async
        mode; sync-mode data never exceeds the cap, so it is 1); False when none was fit to
        train on (skipped)."""
        weight_of = {t.traj_id: w for t, w in zip(trajs, weights or [1.0] * len(trajs), strict=True)}
        with self._submitted_lock:
            for gid in dict.fromkeys(t.group_id for t in trajs):
                self._submitted.pop(gid, None)
                self.trained_groups.append(gid)
        received = len(trajs)
        reward_errors = self.reward_errors.add(trajs, self.step)
        trajs = [t for t in trajs if "reward_error" not in t.extra]  # marked samples never train
        trajs, bad = finite_only(trajs)
        if bad:
            log.warning("step %d: %d sample(s) skipped: %s", self.step + 1, len(bad), "; ".join(bad[:3]))
        self._skipped_nonfinite = getattr(self, "_skipped_nonfinite", 0) + len(bad)
        if not trajs:
            why = [f"{reward_errors} failed their reward ({self.reward_errors.first})"] if reward_errors else []
            why += [f"{len(bad)} had non-finite log-probs ({bad[0]})"] if bad else []
            log.error("step %d: batch skipped, none of its %d samples can train: %s", self.step + 1, received,
                      "; ".join(why))  # fmt: skip
            return False
        t0 = time.perf_counter()
        kept_weights = [weight_of[t.traj_id] for t in trajs]
        batch = self.learner.make_batch(trajs, self.pad_id, kept_weights)
        if self.cfg.train.recompute_old_logprobs:
            batch = self.learner.with_old_logprobs(batch)
        metrics = self.learner.train_step(batch)
        self._clock["train"] += time.perf_counter() - t0
        if metrics.get("actor/step_skipped"):
            self._skipped_updates = getattr(self, "_skipped_updates", 0) + 1
            log.error("step %d: the learner skipped the update: non-finite gradient (loss %s); weights unchanged",
                      self.step + 1, metrics.get("actor/loss"))  # fmt: skip
        metrics["faults/skipped_updates"] = float(getattr(self, "_skipped_updates", 0))
        self.step += 1
        rewards = np.array([t.reward for t in trajs], dtype=np.float64)
        lengths = np.array([len(t.response_ids) for t in trajs])
        self.rewards.append(float(rewards.mean()))
        self.max_staleness_seen = max(self.max_staleness_seen, max(staleness, default=0))
        metrics.update({
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/accuracy": float((rewards >= 1.0).mean()), "response/length_mean": float(lengths.mean()),
            "response/truncated_frac": float(np.mean([t.finish_reason == "length" for t in trajs])),
            "staleness/batch_max": float(max(staleness, default=0)), "staleness/batch_mean": float(np.mean(staleness)),
            "version/engine": float(self.version), "version/lag": float(self.step - self.version),
        })  # fmt: skip
        metrics["data/skipped_nonfinite"] = float(self._skipped_nonfinite)
        metrics["buffer/weight_mean"] = float(np.mean(kept_weights))
        metrics["buffer/weight_min"] = float(np.min(kept_weights))
        metrics["reward/error_frac"] = reward_errors / max(received, 1)
        metrics["faults/reward_errors"] = float(self.reward_errors.failed)
        metrics["faults/engine_restarts"] = float(self.engine_restarts)
        metrics["faults/requeued_groups"] = float(len(self.requeued_groups))
        metrics["faults/refused_prompts"] = float(self.refused_prompts)
        metrics["faults/retried_groups"] = float(self.retried_groups)
        metrics["faults/dropped_groups"] = float(self.dropped_groups)
        self._pending = (metrics, staleness)
        return True

    def _generate_shares(self, shares: list[list[PromptItem]]) -> list | None:
        """Sync mode: each engine generates its share; an engine that dies is restarted and
        its whole share generated again (nothing of it reached the buffer or the learner).
        None when a stop was requested meanwhile: a stop does not wait for a long generation."""
        refs = {i: self.engines[i].generate.remote(share) for i, share in enumerate(shares) if share}
        results = []
        while refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
            if self.stop_reason is not None:
                return None
            for i, ref in list(refs.items()):
                if i in self._dead:
                    continue
                try:
                    results.append(ray.get(ref, timeout=0))
                    del refs[i]
                except ray.exceptions.GetTimeoutError:
                    pass
                except ENGINE_DOWN as err:
                    self._mark_dead(i, err)
            if refs and all(i in self._dead for i in refs):  # the live engines are done: recover
                self._recover_engines(requeue=False)
                refs = {i: self.engines[i].generate.remote(shares[i]) for i in refs}
        return results

    def _sync(self) -> None:
        if self._dead:
            self._recover_engines()  # re-forms the weight group and broadcasts
            return
        t0 = time.perf_counter()
        receiving = [e.receive_weights.remote(self.plan, self.step) for e in self.engines]
        sending = self.learner.broadcast_weights(self.plan)
        for i, ref in enumerate(receiving):
            try:
                ray.get(ref)
            except ENGINE_DOWN as err:
                self._mark_dead(i, err)
            except ray.exceptions.RayTaskError:
                ray.get(sending)  # a learner rank that died mid-broadcast is the cause: its error is the one to report
                raise
        if self._dead:
            # the group lost a member: the learner's side fails (gloo sees the peer gone) or
            # finishes; either way the group is rebuilt and the weights sent again
            try:
                ray.get(sending, timeout=120)
            except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as err:
                log.warning("weight broadcast to a dead engine ended with: %s", str(err).splitlines()[0])
            self._recover_engines()
            return
        ray.get(sending)
        self.version = self.step
        self._clock["sync"] += time.perf_counter() - t0

    # -- engine faults --------------------------------------------------------------------

    def _mark_dead(self, i: int, err: BaseException | None) -> None:
        """Engine i failed a call. Ray restarts it (rollout.max_restarts) unless it is out of
        restarts, which stops the run."""
        if isinstance(err, ray.exceptions.ActorDiedError):
            limit = self.cfg.rollout.max_restarts
            why = str(err).splitlines()[0]
            raise EngineFailed(
                f"engine-{i} died and Ray will not restart it (rollout.max_restarts {limit} used up): {why}"
            ) from err
        if i not in self._dead:
            log.warning("engine-%d is down (%s); Ray is restarting it", i, type(err).__name__ if err else "restarted")
        self._dead.add(i)

    def _recover_engines(self, requeue: bool = True) -> None:
        """Bring every dead engine back: wait for Ray's restart, start its vLLM engine, point it
        at the buffer, re-form the weight group with all engines, send the current weights;
        then requeue the prompts it held that the buffer never received (none lost, none
        generated twice: a group reaches the buffer whole or not at all)."""
        t0 = time.perf_counter()
        dead = sorted(self._dead)
        with self._engines_lock, self._submitted_lock:
            # what the dead engines held: the feeder gives nothing to an engine while it is dead
            held = [gid for gid in self._submitted if self._engine_of.get(gid) in dead] if requeue else []
        for i in dead:
            self._restart_engine(i)
        self._form_weight_group()
        self._dead.clear()  # the broadcast below needs every engine in the new group
        self._sync()
        with self._engines_lock:
            if requeue:
                delivered = set(ray.get(self.buffer.seen_groups.remote(held))) if held else set()
                lost = [gid for gid in held if gid not in delivered]
                by_id = {s.id: s for s in self.task.samples("train")}
                with self._submitted_lock:
                    items = [(gid, by_id[self._submitted.pop(gid)]) for gid in lost]
                self.prompts.requeue(items)
                ray.get(self.buffer.abandon.remote(len(lost)))  # admitted once; admitted again when handed out
                self.requeued_groups += lost
                log.warning("requeued %d prompt(s) the dead engine(s) held; %d had reached the buffer",
                            len(lost), len(delivered))  # fmt: skip
        self.engine_restarts += len(dead)
        log.warning("engine(s) %s back after %.0fs", ", ".join(f"engine-{i}" for i in dead), time.perf_counter() - t0)

    def _restart_engine(self, i: int) -> None:
        engine = self.engines[i]
        deadline = time.monotonic() + self.cfg.train.engine_restart_timeout_s
        while True:
            try:
                ray.get(engine.get_stats.remote(), timeout=30)  # returns once the actor is back
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    limit = self.cfg.train.engine_restart_timeout_s
                    raise EngineFailed(
                        f"engine-{i} was not back within train.engine_restart_timeout_s={limit}"
                    ) from err
                time.sleep(1)
            except ray.exceptions.ActorDiedError as err:
                self._mark_dead(i, err)  # raises: out of restarts
        info = ray.get(engine.start.remote())
        ray.get(engine.set_buffer.remote(self.buffer))  # the restart got the buffer it was created with
        log.warning("engine-%d restarted (%s engine up in %.0fs)", i, info["backend"], info["startup_s"])

    def _after_step(self) -> None:
        cfg = self.cfg.train
        metrics, staleness = self._pending
        metrics.update(ray.get(self.buffer.metrics.remote()))
        stats = []
        for i, e in enumerate(self.engines):
            try:
                stats.append(ray.get(e.get_stats.remote()))
            except ENGINE_DOWN as err:
                self._mark_dead(i, err)  # recovered before the next batch
        tokens, gen_s = sum(s.tokens for s in stats), sum(s.generate_s for s in stats)
        now = time.perf_counter()
        last = getattr(self, "_last", None)
        if last is not None:
            metrics["perf/gen_tokens_per_s"] = (tokens - last[0]) / max(now - last[1], 1e-9)
        self._last = (tokens, now)
        metrics["perf/gen_engine_s_total"] = gen_s
        total, latest = self.learner.refused()
        for who in latest[len(latest) - min(total - self._refused_seen, len(latest)) :]:
            log.warning("refused a connection to the learner's stores: %s did not prove the run's secret", who)
        self._refused_seen = total
        metrics["faults/refused_connections"] = float(total)
        metrics.update({f"time/{k}_s": v for k, v in self._clock.items()})
        shown = []
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            metrics.update(self.evaluate())
            shown = self.eval_examples
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
            self.checkpoint()
        if self.logger is not None:
            self.logger.log(metrics, self.step, {"staleness/histogram": staleness})
            self.logger.log_examples("eval/samples", self.step, shown)

    def evaluate(self) -> dict[str, float]:
        """Mean reward on the held-out split (one sample per prompt at the rollout temperature)."""
        items = [self.item(f"eval-{self.step}-{s.id}", s) for s in self.eval_samples]
        result = ray.get(self.engines[0].generate.remote(items, 1))
        rewards = [t.reward for t in result.trajectories]
        value = float(np.mean(rewards)) if rewards else float("nan")
        self.eval_rewards.append((self.step, value))
        self.eval_examples = examples(result.trajectories, self.tokenizer, self.cfg.train.eval_log_samples)
        return {"eval/reward": value, "eval/accuracy": float(np.mean(np.array(rewards) >= 1.0)) if rewards else 0.0}

    def checkpoint(self) -> Path:
        root = self.checkpoint_root
        state = {"step": self.step, "version": self.version, "prompts": vars(self.prompts.state),
                 "config": typed_config.to_dict(self.cfg)}  # fmt: skip

        def write_state(path: Path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            (path / "state.json").write_text(json.dumps(state, indent=1))

        def snapshot_buffer(path: Path) -> None:
            # Prompts handed out whose groups the buffer had not received by the snapshot are
            # in flight: a resumed run hands them out again, so none is lost or trained twice.
            seen = set(ray.get(self.buffer.snapshot_seen_groups.remote(str(path))))
            with self._submitted_lock:
                state["requeue"] = [[gid, sid] for gid, sid in self._submitted.items() if gid not in seen]
            # and those waiting to be handed out again (from an engine that died; the buffer's
            # admission count already let go of them)
            waiting = [[gid, sample.id] for gid, sample in list(self.prompts.requeued)]
            state["requeue"] += waiting
            state["requeue_abandoned"] = len(waiting)

        # the buffer first: the controller state records what it did not hold
        extra = {"buffer": snapshot_buffer, "controller": write_state}
        return self.learner.save_checkpoint(root, self.step, self.version, extra, self.cfg.train.keep_checkpoints)

    def shutdown(self) -> None:
        self._stop.set()
        for e in getattr(self, "engines", []):
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception as err:  # a dead engine must not stop the others from closing
                log.warning("engine shutdown: %s", err)
            ray.kill(e)
        if getattr(self, "learner", None) is not None:
            self.learner.shutdown()
        if getattr(self, "buffer", None) is not None:
            ray.kill(self.buffer)


def finite_only(trajs: list[Trajectory]) -> tuple[list[Trajectory], list[str]]:
    """Samples whose behaviour log-probs and reward are all finite, and why the others are not:
    one NaN from an engine would make the whole step NaN."""
    kept, reasons = [], []
    for t in trajs:
        lp = np.asarray(t.behavior_logprobs, dtype=np.float64)
        if not np.isfinite(lp).all():
            reasons.append(f"{t.traj_id}: {int((~np.isfinite(lp)).sum())} non-finite behaviour log-prob(s)")
        elif not np.isfinite(t.reward):
            reasons.append(f"{t.traj_id}: reward {t.reward}")
        else:
            kept.append(t)
    return kept, reasons


class LearnerFailed(RuntimeError):
    """A learner rank or another actor the loop depends on died; the message says how to resume."""


class EngineFailed(RuntimeError):
    """An engine died for good (out of restarts) or did not come back in time."""


# an engine call that failed because the engine actor is gone (for now, or for good)
# (dead for now or for good, or restarted by Ray and not started again yet)
ENGINE_DOWN = (ray.exceptions.RayActorError, EngineNotStarted)


def _backend(cfg: RunConfig) -> str:
    return "nccl" if cfg.learner.num_gpus_per_worker > 0 else "gloo"


def _init_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = cfg.train.num_engines * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus_per_worker
    # a local run on a small machine: logical CPUs enough for the layout (they share the cores)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))), include_dashboard=False,
             dashboard_host="127.0.0.1", log_to_driver=True)  # fmt: skip


def check_resources(cfg: RunConfig) -> None:
    """A clear error, before anything starts, when the layout does not fit the cluster."""
    cluster = cluster_from_ray(ray.nodes())
    demand = demand_of(cfg)
    try:
        plan(cluster, demand)
    except PlacementError as err:
        raise PlacementError(f"the run does not fit this Ray cluster: {err}") from err
