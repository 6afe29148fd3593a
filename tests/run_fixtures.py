"""What every training run, on any model, must put on its dashboard."""

from __future__ import annotations

# the metrics a run logs at a step with an evaluation (tests/test_train_e2e.py, test_real_model_run.py)
EXPECTED_KEYS = {
    "reward/mean", "reward/accuracy", "actor/loss", "actor/grad_norm", "vespo/W_mean",
    "staleness/batch_max", "staleness/token_max", "staleness/histogram/values", "buffer/occupancy",
    "buffer/dropped_stale", "perf/train_tokens_per_s", "perf/gen_tokens_per_s", "time/wait_s", "time/train_s",
    "time/sync_s", "sync/bytes", "version/lag", "eval/reward",
}  # fmt: skip
