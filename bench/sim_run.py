"""One simulated run: the real Controller (fleet, sources, weight sync, buffer, admission) wired
to simulated engines and learner ranks, on the scaled clock, and what it measured.

CPU is split three ways: the controller's own (each of its threads' CPU time less what its
calls into the simulated components and the buffer take, its waits and the counting of each
call), the buffer's (its calls and the engines' puts: its own actor in the real system) and
the simulation's (inside the engines' and learner's calls, and the event thread).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

from bench.sim_components import CountedBuffer, SimEngine, SimLearner
from bench.sim_model import RAY_CALL_CPU_S, RAY_CALL_S, CostModel
from bench.sim_world import DISPATCHED, Ledger, World, call_overhead_s, scaled_clock
from buffer.replay import ReplayBuffer
from rollout.records import PromptItem
from vespo.config import run_config
from vespo.orchestration.controller import Controller, RunSummary


@dataclass
class Layout:
    mode: str  # "sync" or "async"
    engines: int = 48
    ranks: int = 16
    groups_per_step: int = 256
    n: int = 8
    steps: int = 12
    staleness_ratio: int = 1  # sync: the paper's N
    max_staleness: int = 4  # async: the buffer's cap (and admission)
    divergence_budget: float | None = None  # async: buffer.divergence_budget (KL per token)
    max_inflight_groups: int | None = None  # per engine, async; None: as many as its KV cache holds
    scale: float = 200.0  # simulated seconds per real second
    warmup_steps: int = 2  # left out of the steady-state figures (the pipeline filling)
    call_s: float = RAY_CALL_S  # what a blocking remote call costs the caller (simulated seconds)
    dispatch_s: float = RAY_CALL_CPU_S  # and a fire-and-forget one

    @property
    def label(self) -> str:
        if self.mode == "sync":
            return f"sync N={self.staleness_ratio}"
        if self.divergence_budget is not None:
            return f"async KL {self.divergence_budget:g}"
        return f"async cap {self.max_staleness}"


@dataclass
class SimResult:
    layout: Layout
    model: CostModel
    summary: RunSummary
    train: list  # sim_components.TrainRecord per step
    calls: dict[str, Counter]  # "loop", "feeder": remote calls by kind
    own_cpu_s: dict[str, float]  # "loop", "feeder": the controller's own CPU, real seconds
    buffer_cpu_s: float
    sim_cpu_s: float
    driver_s: float  # simulated seconds of padded-batch building in the controller's process
    real_s: float
    engine_busy_s: float
    dropped_groups: int
    generated_groups: int  # pushed into the buffer by the engines
    refused_admits: int  # admit calls that got fewer groups than asked for
    caps: list  # (simulated time, cap) each time buffer.divergence_budget changed the buffer's cap

    @property
    def steps(self) -> int:
        return len(self.train)

    @property
    def steady_steps(self) -> int:
        """The steps after the pipeline filled (layout.warmup_steps left out, at least one kept)."""
        return self.steps - min(self.layout.warmup_steps, self.steps - 1)

    def _window(self) -> tuple[int, float, float]:
        w = self.steps - self.steady_steps
        return self.steady_steps, self.train[w - 1].end if w else self.train[0].start, self.train[-1].end

    @property
    def step_s(self) -> float:
        """Steady-state simulated seconds per learner step."""
        k, start, end = self._window()
        return (end - start) / k

    @property
    def learner_idle(self) -> float:
        """Share of the steady state the learner ranks spent not training (waiting for data or
        for the weight broadcast)."""
        k, start, end = self._window()
        return 1 - sum(r.end - r.start for r in self.train[-k:]) / (end - start)

    def caps_in_force(self) -> list[int]:
        """The staleness cap each step trained under: the version cap, or the last one the
        divergence budget set before the step began."""
        out = []
        for record in self.train:
            cap = self.layout.max_staleness
            for at, value in self.caps:
                if at <= record.start:
                    cap = self.layout.max_staleness if value is None else value
            out.append(cap)
        return out

    @property
    def engine_busy(self) -> float:
        return self.engine_busy_s / (self.layout.engines * (self.train[-1].end - self.train[0].start))

    def staleness(self) -> Counter:
        """Trajectories trained, by staleness (all steps)."""
        return Counter(s for r in self.train for s in r.staleness)

    def calls_per_step(self, who: str | None = None) -> Counter:
        total = sum((self.calls[w] for w in ([who] if who else self.calls)), Counter())
        return Counter({k: v / self.steps for k, v in total.items()})

    def cpu_per_step(self, who: str) -> float:
        return self.own_cpu_s.get(who, 0.0) / self.steps

    @property
    def feeder_rounds(self) -> float:
        """Rounds over the fleet per step (each polls every live engine once)."""
        return self.calls_per_step()["engine.poll"] / self.layout.engines

    def client_cpu_per_step(self, who: str | None = None) -> float:
        """What the remote calls would add to the controller's CPU as Ray calls."""
        return sum(self.calls_per_step(who).values()) * RAY_CALL_CPU_S

    def loop_s(self) -> float:
        """The loop thread's time per step outside its waits for data, a learner step or a
        broadcast (its own CPU, and its blocking calls' round trips and client CPU): in series
        with the learner, so it adds to every step once the learner is the bottleneck."""
        calls = self.calls_per_step("loop")
        blocking = sum(v for k, v in calls.items() if k not in DISPATCHED and k != "buffer.get_batch")
        return self.cpu_per_step("loop") + blocking * RAY_CALL_S + self.client_cpu_per_step("loop")


def make_config(layout: Layout, output_dir: str, model: CostModel) -> run_config.RunConfig:
    m = layout
    sync = m.mode == "sync"
    cap = max(m.staleness_ratio - 1, 0) if sync else m.max_staleness
    capacity = (cap + 2) * m.groups_per_step * m.n * (m.staleness_ratio if sync else 1)
    inflight = m.max_inflight_groups or max(1, model.max_seqs // m.n)
    return run_config.load(None, [
        "wandb.mode=disabled", f"train.output_dir={output_dir}", f"rollout.n={m.n}", "train.eval_every=0",
        f"train.groups_per_step={m.groups_per_step}", f"train.steps={m.steps}", f"train.mode={m.mode}",
        f"train.staleness_ratio={m.staleness_ratio if sync else 1}", f"buffer.max_staleness={cap}",
        f"buffer.capacity={capacity}", f"train.max_inflight_groups={inflight}", "train.batch_timeout_s=1e7",
        f"train.num_engines={m.engines}",
        *([f"buffer.divergence_budget={m.divergence_budget}"] if m.divergence_budget is not None else []),
    ])  # fmt: skip


def make_item(gid: str, sample) -> PromptItem:
    return PromptItem(gid, "", sample_id=sample.id)


def simulate(layout: Layout, model: CostModel | None = None) -> SimResult:
    model = model or CostModel()
    ledger = Ledger()
    world = World(layout.scale, ledger, layout.call_s, layout.dispatch_s)
    overhead = call_overhead_s()
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(layout, out, model)
        buffer = ReplayBuffer(cfg.buffer)
        engines = [SimEngine(f"engine-{i}", world, model, buffer, ledger, layout.n) for i in range(layout.engines)]
        learner = SimLearner(world, model, layout.ranks, ledger)
        controller, counted = Controller(cfg), CountedBuffer(buffer, world, ledger)
        controller.assemble(engines, counted, learner, make_item,
                            [e.start().result() for e in engines])  # fmt: skip
        _watch(controller.source, world)
        ledger.reset()  # count the run, not the set-up
        started = time.perf_counter()
        with scaled_clock(world):
            loop = threading.current_thread().name
            summary = controller.run(checkpoint=False)
    real = time.perf_counter() - started
    calls = {"loop": Counter(), "feeder": Counter()}
    for ident, kinds in ledger.thread_kinds.items():
        calls["loop" if world.names.get(ident) == loop else "feeder"].update(kinds)
    own = {"loop": 0.0, "feeder": 0.0}
    for name, (cpu, n) in world.finished.items():
        own["loop" if name == loop else "feeder"] += max(0.0, cpu - n * overhead)
    put_cpu = sum(e.put_cpu_s for e in engines)  # inside engine calls or the event thread
    buffer_calls = sum(v for k, v in ledger.cpu.items() if k.startswith("buffer."))
    return SimResult(
        layout, model, summary, learner.records, calls, own, buffer_calls + put_cpu,
        sum(ledger.cpu.values()) - buffer_calls - put_cpu + world.event_cpu_s, learner.driver_s, real,
        sum(e.stats_.generate_s for e in engines), int(buffer.metrics()["buffer/dropped_groups"]),
        sum(e.groups_pushed for e in engines), counted.refused, counted.caps,
    )  # fmt: skip


def _watch(source, world: World) -> None:
    """The async feeder (AsyncSource's thread) is a controller thread from its start, so time
    waits for its first round; at the end the loop waits for it to stop, not for the clock."""
    start, close = source.start, source.close

    def started() -> None:
        start()
        thread = getattr(source, "_thread", None)
        if thread is not None:
            world.enlist(thread)

    def closed() -> None:
        with world.passive():
            close()

    source.start, source.close = started, closed
