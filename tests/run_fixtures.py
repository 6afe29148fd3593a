"""What every training run, on any model, must put on its dashboard, and how tests run the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the metrics a run logs at a step with an evaluation (tests/test_train_e2e.py, test_real_model_run.py)
EXPECTED_KEYS = {
    "reward/mean", "reward/accuracy", "actor/loss", "actor/grad_norm", "vespo/W_mean",
    "staleness/batch_max", "staleness/token_max", "staleness/histogram/values", "buffer/occupancy",
    "buffer/dropped_stale", "perf/train_tokens_per_s", "perf/gen_tokens_per_s", "time/wait_s", "time/train_s",
    "time/sync_s", "sync/bytes", "version/lag", "eval/reward",
}  # fmt: skip


def vespo(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`vespo ARGS` from the repository root, as a user types it; fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", "vespo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done
