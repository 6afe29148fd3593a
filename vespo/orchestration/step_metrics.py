"""What one step trains on and what it reports.

`Screen` (through `finite_only`) drops the samples no loss should see (a failed reward, a
non-finite log-prob: one NaN would make the whole step NaN) and says why; `step_metrics` turns
a trained batch into the dashboard's per-step metrics (reward/*, response/*, staleness/*,
version/*, faults/*).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from buffer.replay import Batch
from buffer.trajectory import Trajectory
from vespo.orchestration.reward_errors import RewardErrors
from vespo.reporting.episode_stats import episode_metrics

log = logging.getLogger(__name__)


def finite_only(trajs: list[Trajectory]) -> tuple[list[Trajectory], list[str]]:
    """Samples whose behaviour log-probs and reward are all finite, and why the others are not."""
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


@dataclasses.dataclass
class Screened:
    batch: Batch | None  # what trains (None: nothing in it can)
    received: int  # samples the buffer handed over
    reward_errors: int  # of them, marked with a failed reward


class Screen:
    """Keeps the counts across steps (faults/reward_errors, data/skipped_nonfinite)."""

    def __init__(self, samples_per_step: int):
        self.reward_errors = RewardErrors(samples_per_step)
        self.skipped_nonfinite = 0

    def __call__(self, batch: Batch, step: int) -> Screened:
        reward_errors = self.reward_errors.add(batch.trajectories, step)
        keep = [i for i, t in enumerate(batch.trajectories) if "reward_error" not in t.extra]
        finite, bad = finite_only([batch.trajectories[i] for i in keep])
        if bad:
            log.warning("step %d: %d sample(s) skipped: %s", step + 1, len(bad), "; ".join(bad[:3]))
        self.skipped_nonfinite += len(bad)
        ok = {t.traj_id for t in finite}
        keep = [i for i in keep if batch.trajectories[i].traj_id in ok]
        if not keep:
            why = [f"{reward_errors} failed their reward ({self.reward_errors.first})"] if reward_errors else []
            why += [f"{len(bad)} had non-finite log-probs ({bad[0]})"] if bad else []
            log.error("step %d: batch skipped, none of its %d samples can train: %s", step + 1,
                      len(batch.trajectories), "; ".join(why))  # fmt: skip
            return Screened(None, len(batch.trajectories), reward_errors)
        kept = Batch([batch.trajectories[i] for i in keep], [batch.weights[i] for i in keep],
                     [batch.staleness[i] for i in keep], batch.version)  # fmt: skip
        return Screened(kept, len(batch.trajectories), reward_errors)


def step_metrics(screened: Screened, screen: Screen, engine_version: int, step: int) -> dict[str, float]:
    """The batch's own metrics (the learner's, the buffer's and the fleet's are added beside)."""
    batch = screened.batch
    trajs, staleness, weights = batch.trajectories, batch.staleness, batch.weights
    rewards = np.array([t.reward for t in trajs], dtype=np.float64)
    lengths = np.array([len(t.response_ids) for t in trajs])
    return episode_metrics(trajs) | {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "reward/accuracy": float((rewards >= 1.0).mean()), "response/length_mean": float(lengths.mean()),
        "response/truncated_frac": float(np.mean([t.finish_reason == "length" for t in trajs])),
        "staleness/batch_max": float(max(staleness, default=0)), "staleness/batch_mean": float(np.mean(staleness)),
        "version/engine": float(engine_version), "version/lag": float(step - engine_version),
        "data/skipped_nonfinite": float(screen.skipped_nonfinite),
        "buffer/weight_mean": float(np.mean(weights)), "buffer/weight_min": float(np.min(weights)),
        "reward/error_frac": screened.reward_errors / max(screened.received, 1),
        "faults/reward_errors": float(screen.reward_errors.failed),
    }  # fmt: skip

