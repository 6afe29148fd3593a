"""Stability under staleness: every objective at staleness ratio N = 1, 4, 16, 64 (sync) and in
fully async mode, several seeds, one fixed compute budget, on our own system.

Every cell is a real training run (vLLM engine, replay buffer, DeepSpeed learner, weight
broadcast), but all cells share one set of actors: `Controller.begin_run` starts the learner
over from the model with the cell's objective and seed, gives the engine those weights and a
fresh buffer. That saves the ~90 s of start-up per cell that would otherwise eat the budget.

The budget is the same for every cell: `--steps` learner updates of `--groups-per-step`
prompts x rollout.n samples. Sync N generates N x groups-per-step prompts with one set of
weights and makes N updates on them, so the last mini-batch is N-1 versions stale (the
paper's N). Async runs the usual async loop with `--async-max-staleness` as the cap;
`async-cap{K}` with a version cap of K instead, and `async-kl{B}` with staleness measured in
nats: `buffer.divergence_budget` B (KL per token) inside the `--async-max-staleness` cap.

Outputs under --out: steps.csv (every step of every cell), cells.csv (one row a cell),
table.md (the table for docs/results.md), reward_vs_step.png, and a wandb offline run per
cell under wandb/. A cell already in cells.csv is skipped, so a stopped sweep continues.
Sweeps run side by side into separate --out folders merge by concatenating their CSVs into
one folder and running `--report` there: the tables and plot, nothing trained.

    python -m bench.staleness_sweep                    # reduced settings: < 60 min on 2 cores
    python -m bench.staleness_sweep --seeds 0 1 2 --steps 400 --groups-per-step 64 ...  # GPU node
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.sweep_report import admission_table, gain_table, one_batch, plot, sync_ratio, table

# name -> (objective, objective_config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "vespo": ("vespo", {}),
    "vespo-auto": ("vespo", {"target_ess": 0.6}),  # (k, lambda) scaled per batch from a target ESS
    "vespo-lennorm": ("vespo", {"length_norm": True}),  # ablation: geometric-mean weight
    "grpo": ("grpo", {}),
    "gspo": ("gspo", {}),
    "sapo": ("sapo", {}),
    "cispo": ("cispo", {}),
    "vespo-replay": ("vespo", {}),  # MoE models: learner.routing_replay rollout
    "grpo-replay": ("grpo", {}),
}
LEARNER_OPTIONS = {"vespo-replay": {"routing_replay": "rollout"}, "grpo-replay": {"routing_replay": "rollout"}}
MODES = ("sync-1", "sync-4", "sync-16", "sync-64", "async")
STEP_KEYS = {  # steps.csv column -> logged metric
    "reward": "reward/mean",
    "eval_accuracy": "eval/accuracy",
    "seq_w_max": "actor/seq_w_max",
    "seq_w_mean": "actor/seq_w_mean",
    "staleness_max": "staleness/token_max",
    "grad_norm": "actor/grad_norm",
    "kl": "actor/ppo_kl",
    "response_len": "response/length_mean",
    "vespo_shape_scale": "vespo/shape_scale",
    "vespo_ess": "vespo/ess",
    "dropped": "buffer/dropped_stale",  # samples dropped for staleness so far (a running total)
    "wait_s": "time/wait_s",  # the learner's time waiting for data so far
    "train_s": "time/train_s",
    "staleness_cap": "buffer/staleness_cap",  # the cap in force (async-kl: set by the budget)
    "routing_agreement": "routing/agreement",  # MoE: learner routes as the engine did
    **{f"kl_lag{lag}": f"divergence/kl_lag{lag}" for lag in (0, 1, 2, 4, 8)},  # KL per token by data age
}
CELL_FIELDS = ["variant", "mode", "seed", "steps", "start_reward", "peak_reward", "final_reward", "final_eval_accuracy",
               "collapsed", "seq_w_max", "seq_w_mean", "max_staleness", "response_len", "dropped", "learner_idle",
               "mean_cap", "wall_s"]  # fmt: skip
_ASYNC = re.compile(r"async(?:-cap(\d+)|-kl(\d*\.?\d+(?:e-?\d+)?))?$")


@dataclass
class Cell:
    variant: str
    mode: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.variant, self.mode, str(self.seed))

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.mode}_s{self.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.staleness_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in LEARNER_OPTIONS],
                   choices=list(VARIANTS))  # fmt: skip
    p.add_argument("--modes", nargs="+", default=list(MODES),
                   help="sync-N (N >= 1), async, async-capK (version cap K), async-klB (KL budget B)")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=128, help="learner updates per cell (the fixed budget)")
    p.add_argument("--groups-per-step", type=int, default=16, help="prompts per update (x rollout.n samples)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--async-max-staleness", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=0, help="0: evaluate only after the last step")
    p.add_argument("--smooth", type=int, default=8, help="moving-average window (steps) for peak/final/collapse")
    p.add_argument("--collapse-drop", type=float, default=0.10,
                   help="collapsed: the smoothed reward rose, then fell this far below where it started")  # fmt: skip
    p.add_argument("--out", default="runs/staleness_sweep")
    p.add_argument("--config", default=None, help="base YAML config (default: the embedded tiny run)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: table.md and the plot from the CSVs under --out (sweeps merged)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="dotted overrides on the base config, e.g. rollout.n=4")
    args = p.parse_args(argv)
    for mode in args.modes:
        if not _ASYNC.match(mode) and sync_ratio(mode) < 1:
            p.error(f"mode {mode!r}: use sync-N (N >= 1), async, async-capK or async-klB")
    return args


def cell_config(args: argparse.Namespace, cell: Cell):
    """The run config of one cell: the base config plus the cell's objective, mode and seed."""
    from vespo.config import run_config

    cfg = run_config.load(args.config, args.overrides)
    objective, options = VARIANTS[cell.variant]
    if cell.variant in LEARNER_OPTIONS:
        from rollout.engine import moe_experts
        from vespo.models import resolve_model

        if not moe_experts(resolve_model(cfg.model)):
            raise SystemExit(f"variant {cell.variant}: routing replay needs an MoE model (model=tiny-moe)")
    is_async = _ASYNC.match(cell.mode)
    n = 1 if is_async else sync_ratio(cell.mode)
    staleness, budget = max(cfg.buffer.max_staleness, n - 1), None
    if is_async:
        cap, kl = is_async.groups()
        staleness, budget = (int(cap) if cap else args.async_max_staleness), (float(kl) if kl else None)
    # replace() re-runs each section's validation
    options = {**cfg.learner.objective_config, **options}  # an override's option, unless the variant sets it
    learner = replace(cfg.learner, objective=objective, objective_config=options, lr=args.lr, seed=cell.seed,
                      **LEARNER_OPTIONS.get(cell.variant, {}))  # fmt: skip
    train = replace(cfg.train, mode="async" if is_async else "sync", staleness_ratio=n, steps=args.steps,
                    groups_per_step=args.groups_per_step, eval_every=args.eval_every or args.steps,
                    output_dir=str(Path(args.out) / "cells" / cell.name))  # fmt: skip
    wandb = replace(cfg.wandb, dir=str(Path(args.out)), run_name=cell.name, project="vespo-staleness-sweep")
    capacity = max(cfg.buffer.capacity, 2 * n * args.groups_per_step * cfg.rollout.n)  # one sync-N batch fits
    return replace(cfg, learner=learner, train=train, wandb=wandb, task=replace(cfg.task, seed=cell.seed),
                   buffer=replace(cfg.buffer, max_staleness=staleness, capacity=capacity,
                                  divergence_budget=budget))  # fmt: skip


def summarise(cell: Cell, rows: list[dict], wall_s: float, smooth: int, drop: float) -> dict:
    """One cell's row: start / peak / final smoothed reward, collapse, sequence weights."""
    reward = np.array([r["reward"] for r in rows], dtype=np.float64)
    window = max(1, min(smooth, len(reward)))
    smoothed = np.convolve(reward, np.ones(window) / window, mode="valid")
    start, peak_at = float(smoothed[0]), int(np.argmax(smoothed))
    peak, final = float(smoothed[peak_at]), float(smoothed[-1])
    collapsed = peak > start + 0.02 and float(smoothed[peak_at:].min()) < start - drop
    verdict = "" if one_batch(cell.mode, len(rows)) else int(collapsed)  # no verdict on the initial policy's reward
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") not in (None, "")]
    w_max = [r["seq_w_max"] for r in rows if r.get("seq_w_max") not in (None, "")]
    w_mean = [r["seq_w_mean"] for r in rows if r.get("seq_w_mean") not in (None, "")]
    caps = [r["staleness_cap"] for r in rows if r.get("staleness_cap") not in (None, "")]
    lengths = [r["response_len"] for r in rows if r.get("response_len") not in (None, "")]
    last = rows[-1] if rows else {}
    waited, trained = last.get("wait_s") or 0.0, last.get("train_s") or 0.0
    return {
        "variant": cell.variant, "mode": cell.mode, "seed": cell.seed, "steps": len(rows),
        "start_reward": round(start, 4), "peak_reward": round(peak, 4), "final_reward": round(final, 4),
        "final_eval_accuracy": round(float(evals[-1]), 4) if evals else "",
        "collapsed": verdict, "seq_w_max": float(np.max(w_max)) if w_max else "",
        "seq_w_mean": round(float(np.mean(w_mean)), 4) if w_mean else "",
        "max_staleness": max((r.get("staleness_max") or 0) for r in rows),
        "response_len": round(float(np.mean(lengths)), 1) if lengths else "",
        "dropped": int(last.get("dropped") or 0),
        "learner_idle": round(waited / (waited + trained), 4) if waited + trained > 0 else "",
        "mean_cap": round(float(np.mean(caps)), 2) if caps else "", "wall_s": round(wall_s, 1),
    }  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from rich.console import Console

    import configtypes
    from vespo.orchestration.controller import Controller
    from vespo.reporting.run_logger import RunLogger

    console = Console(highlight=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_csv, cells_csv = out / "steps.csv", out / "cells.csv"
    done = {(r["variant"], r["mode"], r["seed"]) for r in read_csv(cells_csv)}
    cells = [Cell(v, m, s) for s in args.seeds for m in args.modes for v in args.variants]
    todo = [] if args.report else [c for c in cells if c.key not in done]
    configs = {c.name: cell_config(args, c) for c in todo}  # every cell's config errors before any work
    console.print(f"staleness sweep: {len(cells)} cells ({len(done & {c.key for c in cells})} already done), "
                  f"{args.steps} steps x {args.groups_per_step} prompts each; out: {out}")  # fmt: skip

    class Recorder(RunLogger):
        """The run's logger that also keeps every step's metrics for the CSV (quietly)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.history: list[dict] = []

        def log(self, metrics, step, histograms=None):
            if self.run is not None:
                self.run.log(dict(metrics), step=step)
            self.history.append({"step": step, **{col: metrics.get(key) for col, key in STEP_KEYS.items()}})

    import ray

    start_ray = bool(todo) and not ray.is_initialized()  # every cell done: only the table and plot
    if start_ray:  # quiet actors: the sweep prints one line a cell
        ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    controller = None
    started = time.perf_counter()
    try:
        for i, cell in enumerate(todo):
            cfg = configs[cell.name]
            logger = Recorder(cfg.wandb, configtypes.to_dict(cfg), Console(quiet=True))
            t0 = time.perf_counter()
            if controller is None:
                controller = Controller(cfg, logger)
                controller.setup()
                console.print(f"actors up in {time.perf_counter() - started:.0f}s")
            controller.begin_run(cfg, logger)
            try:
                controller.run(checkpoint=False)
            finally:
                logger.finish()
            wall = time.perf_counter() - t0
            rows = [{"variant": cell.variant, "mode": cell.mode, "seed": cell.seed, **r} for r in logger.history]
            append_csv(steps_csv, ["variant", "mode", "seed", "step", *STEP_KEYS], rows)
            summary = summarise(cell, logger.history, wall, args.smooth, args.collapse_drop)
            append_csv(cells_csv, CELL_FIELDS, [summary])
            elapsed = time.perf_counter() - started
            eta = elapsed / (i + 1) * (len(todo) - i - 1)
            console.print(
                f"[{i + 1}/{len(todo)}] {cell.name}: reward {summary['start_reward']:.2f} -> peak "
                f"{summary['peak_reward']:.2f} -> final {summary['final_reward']:.2f}"
                f"{'  COLLAPSED' if summary['collapsed'] == 1 else ''}, max W {summary['seq_w_max']:.3g}, "
                f"{wall:.0f}s (elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min)"
            )
    finally:
        if controller is not None:
            controller.shutdown()
        if start_ray:
            ray.shutdown()
    all_cells, all_steps = read_csv(cells_csv), read_csv(steps_csv)
    modes = [m for m in args.modes if any(r["mode"] == m for r in all_cells)]
    text = table(all_cells, args.variants, modes, args.collapse_drop)
    if any(m.startswith("async") for m in modes):
        text += "\n" + admission_table(all_cells, args.variants, modes)
    gains = gain_table(all_steps, args.variants, modes, args.eval_every or 16)
    text += "\n" + gains if gains else ""
    (out / "table.md").write_text(text)
    plot(all_steps, args.variants, modes, args.smooth, out / "reward_vs_step.png")
    console.print((out / "table.md").read_text())
    console.print(f"wrote {steps_csv}, {cells_csv}, {out / 'table.md'}, {out / 'reward_vs_step.png'} "
                  f"in {(time.perf_counter() - started) / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
