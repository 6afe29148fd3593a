"""The staleness sweep (bench/staleness_sweep.py): its bookkeeping, and a small real sweep on
the running system (vLLM engine, buffer, DeepSpeed learner) with actors reused across cells."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from wandb_offline import read_run

from bench import staleness_sweep as sweep
from vespo.config import run_config
from vespo.orchestration.controller import Controller


def rows_of(rewards):
    return [{"step": i + 1, "reward": r, "seq_w_max": 1.0 + i, "seq_w_mean": 1.0, "staleness_max": 3}
            for i, r in enumerate(rewards)]  # fmt: skip


def test_collapse_means_rising_then_falling_below_the_start():
    cell = sweep.Cell("grpo", "sync-4", 0)
    rise_fall = rows_of([0.4] * 10 + [0.6] * 10 + [0.1] * 10)
    steady = rows_of(list(np.linspace(0.4, 0.8, 30)))
    never_rose = rows_of([0.4] * 10 + [0.1] * 20)
    dip_within_margin = rows_of([0.4] * 10 + [0.6] * 10 + [0.35] * 10)
    got = {name: sweep.summarise(cell, rows, 1.0, smooth=5, drop=0.1)
           for name, rows in [("rise_fall", rise_fall), ("steady", steady), ("never_rose", never_rose),
                              ("dip", dip_within_margin)]}  # fmt: skip
    assert got["rise_fall"]["collapsed"] == 1
    assert got["rise_fall"]["peak_reward"] == pytest.approx(0.6)
    assert got["rise_fall"]["final_reward"] == pytest.approx(0.1)
    assert got["steady"]["collapsed"] == 0 and got["steady"]["final_reward"] > 0.75
    assert got["never_rose"]["collapsed"] == 0  # falling from the start is failure to learn, not a collapse
    assert got["dip"]["collapsed"] == 0
    assert got["steady"]["seq_w_max"] == 30.0 and got["steady"]["max_staleness"] == 3


def test_a_cells_row_has_drops_idle_share_cap_and_length():
    rows = [{"step": i, "reward": 0.5, "response_len": 100.0 + 10 * i, "staleness_cap": cap, "dropped": 8 * i,
             "wait_s": 1.0 * i, "train_s": 3.0 * i} for i, cap in [(1, 8.0), (2, 2.0), (3, 2.0)]]  # fmt: skip
    got = sweep.summarise(sweep.Cell("vespo", "async-kl0.01", 0), rows, 1.0, smooth=2, drop=0.1)
    assert got["dropped"] == 24  # running totals: the last step's
    assert got["learner_idle"] == pytest.approx(0.25)  # 3 s waiting of 3 + 9
    assert got["mean_cap"] == pytest.approx(4.0) and got["response_len"] == pytest.approx(120.0)


def test_admission_table_reports_what_each_async_rule_cost():
    cells = [
        {"variant": "vespo", "mode": m, "seed": s, "final_reward": f, "seq_w_max": w, "dropped": d,
         "learner_idle": i, "mean_cap": c}
        for m, s, f, w, d, i, c in [("async", 0, 0.2, 200.0, 0, 0.5, 8.0), ("async", 1, 0.4, 20.0, 0, 0.7, 8.0),
                                    ("async-kl0.01", 0, 0.3, 9.0, 100, 0.8, 2.5), ("sync-1", 0, 0.5, 1.0, 0, 0.1, "")]
    ]  # fmt: skip
    text = sweep.admission_table(cells, ["vespo"], ["sync-1", "async", "async-kl0.01"])
    assert "| vespo | async | 2 | 0.300 | 200 | 0 | 60% | 8.00 |" in text
    assert "| vespo | async-kl0.01 | 1 | 0.300 | 9 | 100 | 80% | 2.50 |" in text
    assert "sync-1" not in text  # sync rounds train what they generate: no admission rule to compare


def test_table_and_plot_from_csv_rows(tmp_path):
    cells = [
        {"variant": "vespo", "mode": "sync-4", "seed": s, "start_reward": 0.62, "final_reward": f,
         "final_eval_accuracy": 0.5, "collapsed": c, "seq_w_max": w, "seq_w_mean": 1.2}
        for s, f, c, w in [(0, 0.7, 0, 3.0), (1, 0.5, 1, 9.0)]
    ]  # fmt: skip
    text = sweep.table(cells, ["vespo", "grpo"], ["sync-4"])
    assert "| vespo | sync-4 | 0.600 (0.50-0.70) | 0.500 | 1/2 | 1/2 | 9 | 1.2 |" in text
    assert "grpo" not in text  # no rows, no line
    steps = [{"variant": "vespo", "mode": "sync-4", "seed": str(s), "step": str(i), "reward": str(0.1 * i)}
             for s in (0, 1) for i in range(1, 11)]  # fmt: skip
    sweep.plot(steps, ["vespo"], ["sync-4"], 3, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # with evaluations along the way, a second row of panels shows held-out accuracy
    for row in steps:
        row["eval_accuracy"] = "0.5" if row["step"] in ("5", "10") else ""
    sweep.plot(steps, ["vespo"], ["sync-4"], 3, tmp_path / "e.png")
    height = lambda p: int.from_bytes(p.read_bytes()[20:24], "big")  # noqa: E731 - the PNG header's height
    assert height(tmp_path / "e.png") > 1.8 * height(tmp_path / "p.png")


def test_a_one_batch_cell_has_no_collapse_verdict():
    """sync-64 over 64 steps trains on one batch from the initial policy: its training reward
    is that policy's, so rising and falling say nothing about the objective."""
    cells = [{"variant": "grpo", "mode": m, "seed": 0, "steps": 64, "start_reward": 0.5, "final_reward": 0.3,
              "final_eval_accuracy": 0.4, "collapsed": 1, "seq_w_max": 9.0, "seq_w_mean": 1.0}
             for m in ("sync-16", "sync-64")]  # fmt: skip
    text = sweep.table(cells, ["grpo"], ["sync-16", "sync-64"])
    assert "| grpo | sync-16 | 0.300 (0.30-0.30) | 0.400 | 1/1 | 1/1 |" in text
    assert "| grpo | sync-64 | 0.300 (0.30-0.30) | 0.400 | n/a | n/a |" in text
    rise_fall = rows_of([0.4] * 20 + [0.6] * 20 + [0.1] * 24)  # 64 steps: a collapse by the rule, at N = 16
    assert sweep.summarise(sweep.Cell("grpo", "sync-16", 0), rise_fall, 1.0, smooth=5, drop=0.1)["collapsed"] == 1
    assert sweep.summarise(sweep.Cell("grpo", "sync-64", 0), rise_fall, 1.0, smooth=5, drop=0.1)["collapsed"] == ""


def test_gain_table_compares_each_cell_with_the_one_batch_cell_of_its_seed():
    """Per seed, step by step on the same prompts: the trained cell's reward minus the
    one-batch cell's, averaged by block; a variant without its own one-batch cell uses the
    first variant's."""
    steps = []
    for seed, lift in ((0, 0.1), (1, 0.3)):
        for t in range(1, 9):
            prompts = 0.2 + 0.05 * (t % 3) + 0.1 * seed  # the same prompt noise in every cell of a seed
            row = {"seed": str(seed), "step": str(t)}
            steps += [{**row, "variant": "vespo", "mode": "sync-8", "reward": prompts},
                      {**row, "variant": "vespo", "mode": "async", "reward": prompts + (lift if t > 4 else 0.0)},
                      {**row, "variant": "grpo", "mode": "async", "reward": prompts - 0.1}]  # fmt: skip
    text = sweep.gain_table(steps, ["vespo", "grpo"], ["sync-8", "async"], block=4)
    assert "gain over sync-8" in text
    assert "| vespo | async | 2 | +0.00 | +0.20 | +0.10 +0.30 |" in text
    assert "| grpo | async | 2 | -0.10 | -0.10 | -0.10 -0.10 |" in text
    assert "| vespo | sync-8 |" not in text  # the baseline itself
    assert sweep.gain_table(steps, ["vespo"], ["async"], block=4) == ""  # no one-batch cell: no table


def test_report_writes_tables_and_plot_from_merged_csvs_and_trains_nothing(tmp_path):
    """Two sweeps run side by side merge by concatenating their CSVs: --report then makes the
    tables and the plot of everything there, and runs no cell, not even the missing ones."""
    out = tmp_path / "merged"
    out.mkdir()
    steps = [{"variant": v, "mode": m, "seed": 0, "step": t, "reward": 0.3 + 0.01 * t, "seq_w_max": 2.0,
              "seq_w_mean": 1.0, "eval_accuracy": 0.4 if t == 8 else "", "wait_s": t, "train_s": t,
              "staleness_cap": 4.0, "dropped": 0}
             for v, m in (("vespo", "sync-8"), ("vespo", "async")) for t in range(1, 9)]  # fmt: skip
    sweep.append_csv(out / "steps.csv", ["variant", "mode", "seed", "step", *sweep.STEP_KEYS], steps)
    cells = [sweep.summarise(sweep.Cell("vespo", m, 0), [r for r in steps if r["mode"] == m], 1.0, 2, 0.1)
             for m in ("sync-8", "async")]  # fmt: skip
    sweep.append_csv(out / "cells.csv", sweep.CELL_FIELDS, cells)
    import ray

    sweep.main(["--variants", "vespo", "grpo", "--modes", "sync-8", "async", "--seeds", "0", "1", "--steps", "8",
                "--out", str(out), "--report"])  # fmt: skip
    assert not ray.is_initialized()
    assert len(list(csv.DictReader((out / "cells.csv").open()))) == 2  # grpo and seed 1 were not run
    text = (out / "table.md").read_text()
    assert "| vespo | async |" in text and "| vespo | sync-8 |" in text and "gain over sync-8" in text
    assert (out / "reward_vs_step.png").stat().st_size > 0


def test_cell_config_sets_objective_mode_and_staleness():
    args = sweep.parse_args(["--steps", "8", "--groups-per-step", "2", "--async-max-staleness", "5"])
    sync = sweep.cell_config(args, sweep.Cell("vespo-lennorm", "sync-64", 1))
    assert (sync.train.mode, sync.train.staleness_ratio, sync.buffer.max_staleness) == ("sync", 64, 63)
    assert sync.learner.objective_config == {"length_norm": True} and sync.learner.seed == sync.task.seed == 1
    asyn = sweep.cell_config(args, sweep.Cell("vespo-auto", "async", 0))
    assert (asyn.train.mode, asyn.buffer.max_staleness) == ("async", 5)
    assert asyn.learner.objective_config["target_ess"] > 0
    assert asyn.buffer.divergence_budget is None
    capped = sweep.cell_config(args, sweep.Cell("vespo", "async-cap2", 0))
    assert (capped.train.mode, capped.buffer.max_staleness, capped.buffer.divergence_budget) == ("async", 2, None)
    nats = sweep.cell_config(args, sweep.Cell("vespo", "async-kl0.004", 0))
    assert (nats.train.mode, nats.buffer.max_staleness, nats.buffer.divergence_budget) == ("async", 5, 0.004)
    # an objective option given as an override reaches every cell; the variant's own win
    args = sweep.parse_args(["learner.objective_config.agg=seq-mean-token-mean"])
    merged = sweep.cell_config(args, sweep.Cell("vespo-lennorm", "sync-1", 0)).learner.objective_config
    assert merged == {"agg": "seq-mean-token-mean", "length_norm": True}
    for bad in ("sync-0", "async-cap", "async-klx", "async2"):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--modes", bad])


def test_begin_run_refuses_changes_that_need_new_actors():
    cfg = run_config.load(None, [])
    controller = Controller(cfg)
    with pytest.raises(ValueError, match="must not change: train.num_engines, learner.world_size"):
        controller.begin_run(replace(cfg, train=replace(cfg.train, num_engines=2),
                                     learner=replace(cfg.learner, world_size=2)))  # fmt: skip
    with pytest.raises(ValueError, match=r"task \(other than its seed\)"):
        controller.begin_run(replace(cfg, task=replace(cfg.task, max_digits=2)))


@pytest.mark.slow  # CI time: the sweeps in docs/results.md run this path cell after cell
def test_a_small_sweep_runs_every_cell_on_shared_actors(tmp_path):
    out = tmp_path / "sweep"
    argv = ["--variants", "vespo", "grpo", "--modes", "sync-3", "async", "--seeds", "0", "--steps", "6",
            "--groups-per-step", "2", "--async-max-staleness", "2", "--out", str(out), "rollout.n=4"]  # fmt: skip
    sweep.main(argv)
    import ray

    assert not ray.is_initialized()  # the sweep stops the Ray it started
    cells = list(csv.DictReader((out / "cells.csv").open()))
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert sorted((c["variant"], c["mode"]) for c in cells) == sorted(
        [("vespo", "sync-3"), ("grpo", "sync-3"), ("vespo", "async"), ("grpo", "async")]
    )
    for cell in cells:
        mine = [s for s in steps if (s["variant"], s["mode"]) == (cell["variant"], cell["mode"])]
        assert [int(s["step"]) for s in mine] == list(range(1, 7))  # every run starts again at step 1
        stale = [float(s["staleness_max"]) for s in mine]
        if cell["mode"] == "sync-3":
            assert stale == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]  # N-1 versions old at the end of each batch
            assert float(cell["seq_w_max"]) >= 1.0
        else:
            assert max(stale) <= 2.0
        assert all(0.0 <= float(s["reward"]) <= 1.0 for s in mine)
    runs = sorted(Path(out, "wandb").glob("offline-run-*"))
    assert len(runs) == 4
    history, config = read_run(runs[0])
    assert len(history) == 6 and config["learner"]["objective"] in ("vespo", "grpo")
    assert "| vespo | sync-3 |" in (out / "table.md").read_text()
    assert (out / "reward_vs_step.png").stat().st_size > 0
    # run again: every cell is done, nothing is retrained
    sweep.main(argv)
    assert len(list(csv.DictReader((out / "cells.csv").open()))) == 4
