"""End to end: the real stack (vLLM engine actor, buffer actor, DeepSpeed learner, local Ray,
wandb offline) for a few steps, in async mode and in sync mode with staleness ratio 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb_offline import read_run

from vespo import run_config
from vespo.train import run

EXPECTED_KEYS = {
    "reward/mean", "reward/accuracy", "actor/loss", "actor/grad_norm", "vespo/W_mean",
    "staleness/batch_max", "staleness/token_max", "staleness/histogram/values", "buffer/occupancy",
    "buffer/dropped_stale", "perf/train_tokens_per_s", "perf/gen_tokens_per_s", "time/wait_s", "time/train_s",
    "time/sync_s", "version/lag", "eval/reward",
}  # fmt: skip


def config(tmp_path: Path, *overrides: str) -> run_config.RunConfig:
    return run_config.load(None, [
        "train.steps=4", "train.groups_per_step=4", "train.eval_every=2", "train.eval_prompts=8",
        "train.max_inflight_groups=8", "rollout.n=4", "buffer.max_staleness=1", f"train.output_dir={tmp_path}",
        f"wandb.dir={tmp_path}", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_training_runs_end_to_end(tmp_path, mode):
    extra = ["train.mode=sync", "train.staleness_ratio=2"] if mode == "sync" else []
    cfg = config(tmp_path, *extra)
    summary = run(cfg)

    assert summary.steps == 4
    assert summary.version == 4  # a broadcast after every step (async), after every N=2 steps (sync)
    assert summary.max_batch_staleness <= cfg.buffer.max_staleness
    assert len(summary.rewards) == 4 and all(0.0 <= r <= 1.0 for r in summary.rewards)

    ckpt = Path(summary.checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["policy_version"] == 4
    assert (ckpt / "model" / "model.safetensors").exists() and (ckpt / "buffer" / "buffer.msgpack").exists()
    assert json.loads((ckpt / "controller" / "state.json").read_text())["step"] == 4

    history, logged_config = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    keys = set().union(*history)
    assert EXPECTED_KEYS <= keys, EXPECTED_KEYS - keys
    steps = [row["_step"] for row in history if "reward/mean" in row]
    assert steps == [1, 2, 3, 4]
    assert all(row["staleness/batch_max"] <= cfg.buffer.max_staleness for row in history if "reward/mean" in row)
    if mode == "sync":  # N=2: the second update of each rollout batch trains on one-version-old data
        assert [row["staleness/batch_max"] for row in history if "reward/mean" in row] == [0, 1, 0, 1]
    assert logged_config["train"]["mode"] == mode

    if mode == "async":  # `vespo eval` scores the checkpoint's exported model with a real engine
        from vespo.evaluate import checkpoint_model, evaluate

        result = evaluate(config(tmp_path), checkpoint_model(tmp_path / "checkpoints"), prompts=6, samples=3)
        assert result.model == str(ckpt / "model") and result.prompts == 6 and result.failed_prompts == 0
        assert 0.0 <= result.accuracy <= result.pass_at_k <= 1.0 and result.mean_response_tokens > 0
