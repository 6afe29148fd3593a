"""In-process stand-ins for an engine and the learner, behind vespo.orchestration.contracts, for unit tests
of the orchestration (admission, requeue, recovery, sync-N rounds, stop, resume) in seconds.

They fake only what needs Ray, vLLM or DeepSpeed: the buffer is the real ReplayBuffer, the
prompt stream, fleet, sources, weight sync and checkpoint files are the real code. Real-stack
end-to-end tests of the same paths live beside these (test_train_e2e, test_engine_faults,
test_resume, test_real_model_run).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from buffer.replay import Batch, ReplayBuffer
from buffer.trajectory import Trajectory
from learner import checkpoint
from learner.checkpoint.reader import DEEPSPEED_TAG
from learner.step_result import StepResult
from rollout.records import PromptItem, RolloutResult
from vespo.config import run_config
from vespo.orchestration.contracts import Done, EngineDown, EngineLost
from vespo.orchestration.controller import Controller, RunSummary


@dataclass
class FakeStats:
    tokens: int = 0
    generate_s: float = 0.0


def make_item(gid: str, sample) -> PromptItem:
    return PromptItem(gid, sample.prompt, answer=sample.answer, sample_id=sample.id)


def make_group(gid: str, n: int, version: int, engine: str = "engine-0", sample_id: str = "") -> list[Trajectory]:
    """One whole group as an engine holding the weights of `version` would push it: two
    response tokens per sample, rewards alternating 0 and 1."""
    return [Trajectory(traj_id=f"{gid}/{i}", group_id=gid, group_size=n, prompt_ids=[1, 2], response_ids=[3, 4],
                       behavior_logprobs=[-0.5, -0.5], token_versions=[version] * 2, version_start=version,
                       version_end=version, reward=float(i % 2), engine_id=engine, extra={"sample_id": sample_id})
            for i in range(n)]  # fmt: skip


class FakeEngine:
    """Generates instantly: every submitted prompt becomes a whole group, tagged with the
    version of the weights it holds, pushed into the buffer at the next poll (or held until
    `release()` with hold=True). `kill()` is a crash Ray will restart; `lose()` one it will not;
    `crash_on_receive = k` crashes it in each of the next k weight broadcasts.

    The feeder thread polls and submits while the loop thread broadcasts, kills or drains, so
    what it holds is guarded by a lock. `events` (shareable between engines and the learner)
    records ("submit", name, group id), ("receive", name, version), ("restart"|"kill", name, None)
    in order, for tests of what happened before what."""

    def __init__(self, name: str, buffer: ReplayBuffer, n: int = 2, receivers: int = 1, hold: bool = False,
                 events: list | None = None):  # fmt: skip
        self.name, self.buffer, self.n, self.receivers, self.hold = name, buffer, n, receivers, hold
        self.version, self.started, self.alive, self.lost = 0, False, True, False
        self.pending: list[PromptItem] = []
        self.failures: list[tuple[str, str, bool]] = []
        self.fail: dict[str, tuple[str, bool]] = {}  # group id -> (reason, refused): how it will fail, once
        self.submitted: list[str] = []  # every group id handed to this engine, in order
        self.versions_received: list[int] = []
        self.killed_with: list[str] = []  # group ids it was generating when it last crashed
        self.crash_on_receive = 0
        self.joins = 0
        self.stats_ = FakeStats()
        self.events = events if events is not None else []
        self.lock = threading.RLock()

    def _info(self) -> dict:
        return {"engine_id": self.name, "backend": "fake", "startup_s": 0.0, "receivers": self.receivers}

    def _up(self) -> None:
        if self.lost:
            raise EngineLost(f"{self.name} is gone for good")
        if not self.alive:
            raise EngineDown(f"{self.name} is down")

    def start(self) -> Done:
        self.started = True
        return Done(self._info())

    def restart(self, timeout_s: float) -> dict:
        if self.lost:
            raise EngineLost(f"{self.name} is gone for good")
        with self.lock:
            self.alive, self.started, self.version = True, True, 0  # back with the base model
            self.events.append(("restart", self.name, None))
        return self._info()

    def poll(self) -> tuple[int, list]:
        with self.lock:
            self._up()
            if not self.started:
                return -1, []
            if not self.hold:
                self.release()
            failed, self.failures = self.failures, []
            return len(self.pending), failed

    def submit(self, items: list[PromptItem]) -> None:
        with self.lock:
            if self.alive and not self.lost:  # a dead engine's submits vanish, as with a real actor
                self.pending += items
                self.submitted += [i.group_id for i in items]
                self.events += [("submit", self.name, i.group_id) for i in items]

    def release(self, count: int | None = None) -> None:
        """Finish `count` (all) pending groups: into the buffer, or into the failures."""
        with self.lock:
            done, self.pending = self.pending[:count], self.pending[len(self.pending[:count]) :]
            for item in done:
                if item.group_id in self.fail:
                    why, refused = self.fail.pop(item.group_id)
                    self.failures.append((item.group_id, why, refused))
                else:
                    self.buffer.put_many(self.group(item))

    def group(self, item: PromptItem, n: int | None = None) -> list[Trajectory]:
        n = n or self.n
        self.stats_.tokens += 2 * n
        return make_group(item.group_id, n, self.version, self.name, item.sample_id)

    def generate(self, items: list[PromptItem], n: int | None = None) -> RolloutResult:
        self._up()
        return RolloutResult([t for item in items for t in self.group(item, n)])

    def set_buffer(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer

    def join_weight_group(self, host: str, port: int, offset: int, world: int, backend: str, secret: str) -> Done:
        self.joins += 1
        return Done()

    def receive_weights(self, plan: list, version: int) -> Done:
        with self.lock:
            if self.crash_on_receive:
                self.crash_on_receive -= 1
                self.kill()
            try:
                self._up()
            except (EngineDown, EngineLost) as err:
                return Done(error=err)
            self.version = version
            self.versions_received.append(version)
            self.events.append(("receive", self.name, version))
        return Done({"version": version})

    def stats(self) -> FakeStats:
        self._up()
        return self.stats_

    def drain(self) -> None:
        self.release()

    def shutdown(self) -> None:
        with self.lock:
            self.pending = []

    def kill(self) -> None:
        """A crash: what it was generating is gone; Ray brings the actor back without an engine."""
        with self.lock:
            self.killed_with = [i.group_id for i in self.pending]
            self.alive, self.started, self.pending = False, False, []
            self.events.append(("kill", self.name, None))

    def lose(self) -> None:
        self.kill()
        self.lost = True


class FakeLearner:
    """Records every batch; its 'weights' are its step count. Checkpoints are real checkpoint
    directories (the learner's part is one JSON file) written by learner.checkpoint."""

    def __init__(self, events: list | None = None):
        self.step = 0
        self.batches: list[Batch] = []
        self.groups_formed = self.broadcasts = 0
        self.events = events if events is not None else []  # ("train", "learner", step after it)

    def train(self, batch: Batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult:
        self.batches.append(batch)
        self.step += 1
        self.events.append(("train", "learner", self.step))
        return StepResult({"actor/loss": 0.0})

    def open_weight_sync(self, num_receivers: int, bucket_bytes: int) -> tuple[str, int, str]:
        self.groups_formed += 1
        return "127.0.0.1", 0, "00"

    def connect_weight_sync(self) -> Done:
        return Done()

    def weight_plan(self) -> list:
        return []

    def broadcast_weights(self, plan: list) -> Done:
        self.broadcasts += 1
        return Done()

    def refused(self) -> tuple[int, list[str]]:
        return 0, []

    def save_checkpoint(self, root: Path, step: int, version: int, extra: dict, keep: int) -> Path:
        staged = checkpoint.prepare_staging(root, step)
        state = staged / "deepspeed" / DEEPSPEED_TAG  # where validate looks for the learner's state
        state.mkdir(parents=True)
        (state / "learner.json").write_text(json.dumps({"step": self.step}))
        (staged / "rng").mkdir()
        (staged / "rng" / "rank_0.safetensors").write_bytes(b"")  # one rank, no random state to keep
        for name, write in extra.items():
            write(staged / name)
        return checkpoint.finalize(root, checkpoint.CheckpointMeta(step, version, 1, 0), keep=keep)

    def load_checkpoint(self, path: Path) -> checkpoint.CheckpointMeta:
        found = checkpoint.latest(path)
        state = found / "deepspeed" / DEEPSPEED_TAG / "learner.json"
        self.step = json.loads(state.read_text())["step"]
        return checkpoint.read_meta(found)

    def rebuild(self, cfg) -> None:
        self.step = 0

    def shutdown(self) -> None:
        pass


class FakeLogger:
    """Keeps every step's metrics: the faults/*, data/* and buffer/* values the dashboard would show."""

    location = ""

    def __init__(self):
        self.metrics: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int, histograms: dict | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_examples(self, key: str, step: int, items: list) -> None:
        pass


def fake_config(output_dir: str | Path, *overrides: str) -> run_config.RunConfig:
    """A small run: 2 samples per group, 2 groups per step, no evaluation; a batch that never
    comes fails the test in 10 s (train.batch_timeout_s) instead of hanging it."""
    return run_config.load(None, ["wandb.mode=disabled", f"train.output_dir={output_dir}", "rollout.n=2",
                                  "train.groups_per_step=2", "train.eval_every=0", "train.steps=4",
                                  "train.max_inflight_groups=2", "train.batch_timeout_s=10", *overrides])  # fmt: skip


def assemble(cfg: run_config.RunConfig, buffer: ReplayBuffer, engines: list[FakeEngine], learner: FakeLearner,
             logger: FakeLogger | None = None, resume_from: Path | None = None) -> Controller:  # fmt: skip
    """The controller wired to the fakes, as `Controller.setup` wires the real components."""
    controller = Controller(cfg, logger)
    controller.assemble(engines, buffer, learner, make_item, [e.start().result() for e in engines], resume_from)
    return controller


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s")
        time.sleep(0.01)


class Running:
    """`controller.run()` in a thread, so a test can act on the run while it waits for data."""

    def __init__(self, controller: Controller, checkpoint: bool = False):
        self.controller, self.summary, self.error = controller, None, None
        self.thread = threading.Thread(target=self._run, args=(checkpoint,), daemon=True)
        self.thread.start()

    def _run(self, checkpoint: bool) -> None:
        try:
            self.summary = self.controller.run(checkpoint=checkpoint)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread by result()
            self.error = err

    def result(self, timeout: float = 10.0) -> RunSummary:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.controller.request_stop("the test timed out")
            self.thread.join(5)
            raise AssertionError(f"run() did not return within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.summary
