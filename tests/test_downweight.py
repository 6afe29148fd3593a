"""`buffer.stale_policy: downweight` reaches the loss: the buffer's per-trajectory weights travel
with the batch into the advantages, and a group of weight w contributes exactly w times its
gradient, for every objective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from learner_fixtures import synthetic_trajectories

from learner.config import LearnerConfig
from learner.group import LearnerGroup
from learner.objectives import compute_loss
from vespo import run_config
from vespo.controller import Controller


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


class RecordingLearner:
    def make_batch(self, trajs, pad_id, weights):
        self.trajs, self.weights = trajs, weights
        return "batch"

    def train_step(self, batch):
        return {}


def test_the_controller_hands_the_buffers_weights_to_the_learner_aligned_after_filtering():
    controller = Controller(run_config.load(None, ["wandb.mode=disabled", "buffer.stale_policy=downweight"]))
    controller.learner, controller.pad_id = RecordingLearner(), 0
    controller.rewards, controller.max_staleness_seen = [], 0
    trajs = synthetic_trajectories(n_groups=2, group_size=4)
    trajs[1].extra["reward_error"] = "ValueError: broken"  # marked samples never train: weights must stay aligned
    weights = [1.0] * 4 + [0.5] * 4
    assert controller._train(trajs, [0] * 4 + [5] * 4, weights)
    kept = [t.traj_id for t in controller.learner.trajs]
    assert "g0-1" not in kept and controller.learner.weights == [1.0] * 3 + [0.5] * 4
    metrics, _ = controller._pending
    assert metrics["buffer/weight_min"] == 0.5
    # sync mode trains straight from the engines: data within the cap, weight 1
    assert controller._train(synthetic_trajectories(n_groups=1), [0] * 4)
    assert controller.learner.weights == [1.0] * 4
