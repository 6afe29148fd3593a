"""`buffer.stale_policy: downweight` reaches the loss: the buffer's per-trajectory weights travel
with the batch into the advantages, and a group of weight w contributes exactly w times its
gradient, for every objective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from learner_fixtures import synthetic_trajectories

from buffer.replay import Batch
from learner.config import LearnerConfig
from learner.group import LearnerGroup
from learner.objectives import compute_loss
from vespo.orchestration.step_metrics import Screen, step_metrics


def batch_with(weights):
    trajs = synthetic_trajectories(n_groups=2, group_size=4)
    fake = SimpleNamespace(cfg=LearnerConfig(model_path="unused"))
    return LearnerGroup.make_batch(fake, trajs, 0, weights)


def logprob_grad(name: str, batch) -> torch.Tensor:
    torch.manual_seed(0)
    logprobs = (batch.behavior_logprobs + 0.05 * torch.randn_like(batch.behavior_logprobs)).requires_grad_(True)
    loss, _ = compute_loss(name, logprobs, batch.behavior_logprobs, batch.advantages, batch.response_mask)
    loss.backward()
    return logprobs.grad


@pytest.mark.parametrize("name", ["vespo", "grpo", "gspo", "sapo", "cispo"])
def test_a_down_weighted_group_contributes_its_weight_times_the_gradient(name):
    w = 0.25
    full = logprob_grad(name, batch_with(None))
    weighted = logprob_grad(name, batch_with([1.0] * 4 + [w] * 4))  # group g1 is two versions past the cap
    assert full[4:].abs().sum() > 0
    torch.testing.assert_close(weighted[:4], full[:4], rtol=1e-5, atol=1e-7)  # the fresh group: unchanged
    torch.testing.assert_close(weighted[4:], w * full[4:], rtol=1e-5, atol=1e-7)  # the stale one: scaled by w


def test_weights_must_be_one_per_trajectory_and_not_negative():
    with pytest.raises(ValueError, match="one weight >= 0 per trajectory"):
        batch_with([1.0] * 3)
    with pytest.raises(ValueError, match="one weight >= 0 per trajectory"):
        batch_with([1.0] * 7 + [-1.0])


def test_the_weights_stay_aligned_with_the_samples_the_screen_keeps():
    """A sample with a failed reward never trains; the batch that does keeps each sample's own
    weight, so the stale group is still scaled and the fresh one is not. The run-level path
    (buffer -> Controller.run -> learner) is tests/test_orchestration.py, both modes."""
    trajs = synthetic_trajectories(n_groups=2, group_size=4)
    trajs[1].extra["reward_error"] = "ValueError: broken"
    weights = [1.0] * 4 + [0.5] * 4
    screen = Screen(samples_per_step=8)
    screened = screen(Batch(trajs, weights, [0] * 4 + [5] * 4, 5), step=0)
    kept = screened.batch
    assert [t.traj_id for t in kept.trajectories] == [t.traj_id for i, t in enumerate(trajs) if i != 1]
    assert kept.weights == [1.0] * 3 + [0.5] * 4 and kept.staleness == [0] * 3 + [5] * 4
    metrics = step_metrics(screened, screen, engine_version=5, step=5)
    assert metrics["buffer/weight_min"] == 0.5 and metrics["faults/reward_errors"] == 1
    fake = SimpleNamespace(cfg=LearnerConfig(model_path="unused"))
    weighted = LearnerGroup.make_batch(fake, kept.trajectories, 0, kept.weights)
    plain = LearnerGroup.make_batch(fake, kept.trajectories, 0, None)
    torch.testing.assert_close(weighted.advantages[:3], plain.advantages[:3])
    torch.testing.assert_close(weighted.advantages[3:], 0.5 * plain.advantages[3:])
