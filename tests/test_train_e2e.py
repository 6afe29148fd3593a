"""End to end on the toy: the real stack (vLLM engine actor, buffer actor, DeepSpeed learner,
local Ray, wandb offline) for a few steps in sync mode with staleness ratio 2, and a run whose
reward always fails. Async mode end to end runs on the real model (tests/test_real_model_run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_fixtures import EXPECTED_KEYS
from wandb_offline import read_run

from vespo.commands.train import run
from vespo.config import run_config

ROOT = Path(__file__).resolve().parents[1]



def config(tmp_path: Path, *overrides: str) -> run_config.RunConfig:
    return run_config.load(None, [
        "train.steps=4", "train.groups_per_step=4", "train.eval_every=2", "train.eval_prompts=8",
        "train.max_inflight_groups=8", "rollout.n=4", "buffer.max_staleness=1", f"train.output_dir={tmp_path}",
        f"wandb.dir={tmp_path}", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize("mode", ["sync"])  # async: tests/test_real_model_run.py, same checks
def test_training_runs_end_to_end(tmp_path, mode):
    extra = ["train.mode=sync", "train.staleness_ratio=2"] if mode == "sync" else []
    cfg = config(tmp_path, *extra, "train.checkpoint_every=1", "train.keep_checkpoints=2")
    cores = os.sched_getaffinity(0)
    summary = run(cfg)
    assert os.sched_getaffinity(0) == cores  # the driver, kept off the learner's core during the run, has all back

    assert summary.steps == 4
    assert summary.version == 4  # a broadcast after every step (async), after every N=2 steps (sync)
    assert summary.max_batch_staleness <= cfg.buffer.max_staleness
    assert len(summary.rewards) == 4 and all(0.0 <= r <= 1.0 for r in summary.rewards)
    if len(os.sched_getaffinity(0)) >= 2:  # the engine and the learner rank ran on cores of their own
        engine, rank = summary.cores["engine-0"], summary.cores["learner-0"]
        assert engine and rank and not set(engine) & set(rank), summary.cores

    ckpt = Path(summary.checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["policy_version"] == 4
    assert (ckpt / "model" / "model.safetensors").exists() and (ckpt / "buffer" / "buffer.msgpack").exists()
    assert json.loads((ckpt / "controller" / "state.json").read_text())["step"] == 4
    # a checkpoint after every step, of which only the newest 2 are kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000004"]

    history, logged_config = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    keys = set().union(*history)
    assert EXPECTED_KEYS <= keys, EXPECTED_KEYS - keys
    steps = [row["_step"] for row in history if "reward/mean" in row]
    assert steps == [1, 2, 3, 4]
    assert all(row["staleness/batch_max"] <= cfg.buffer.max_staleness for row in history if "reward/mean" in row)
    if mode == "sync":  # N=2: the second update of each rollout batch trains on one-version-old data
        assert [row["staleness/batch_max"] for row in history if "reward/mean" in row] == [0, 1, 0, 1]
    assert logged_config["train"]["mode"] == mode
    # `vespo eval` on an exported checkpoint: tests/test_real_model_run.py, on the real model


@pytest.mark.slow  # CI time; in CI: RewardsFailing on the pool (tests/test_rewards.py), failed samples on fakes
def test_a_reward_that_always_fails_stops_the_run_with_its_error(tmp_path):
    """Not `batch skipped` until batch_timeout_s: the run ends early, saying what the reward raised."""
    (tmp_path / "broken_reward.py").write_text("def reward(response, answer):\n    return {'no': 'score'}['score']\n")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vespo", "train", "task.reward_fn=broken_reward:reward", "train.steps=50",
         "train.groups_per_step=4", "rollout.n=4", "train.max_inflight_groups=8", f"train.output_dir={tmp_path}",
         "wandb.mode=disabled"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run failed: " in done.stderr and "failed their reward, e.g." in done.stderr
    assert "reward raised KeyError: 'score'" in done.stderr
    assert "step 1/50" not in done.stdout  # no update was made on nothing
    assert time.monotonic() - started < 300
