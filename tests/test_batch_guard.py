import math

import numpy as np

from buffer import Trajectory
from vespo.orchestration.step_metrics import finite_only


def traj(tid: str, logprobs, reward: float = 1.0) -> Trajectory:
    n = len(logprobs)
    return Trajectory(tid, "g", 3, [1, 2], list(range(n)), np.array(logprobs, np.float32), [0] * n, 0, 0, reward=reward)


def test_samples_with_nan_or_inf_log_probs_or_rewards_are_skipped_with_the_reason():
    good = traj("g/0", [-0.1, -2.0])
    kept, reasons = finite_only([good, traj("g/1", [-0.1, math.nan, -math.inf]), traj("g/2", [-0.5], math.nan)])
    assert kept == [good]
    assert reasons == ["g/1: 2 non-finite behaviour log-prob(s)", "g/2: reward nan"]
