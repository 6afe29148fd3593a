import numpy as np
import pytest
import torch

from learner.objectives import VespoConfig, compute_loss
from learner.objectives.autotune import T_MAX, ess, shape_scale
from learner.objectives.vespo import log_phi, phi


def test_ess_bounds():
    assert ess(np.ones(8)) == pytest.approx(1.0)
    assert ess(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)
    assert ess(np.zeros(3)) == 0.0


@pytest.mark.parametrize("target", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_scale_is_the_largest_meeting_the_target(target, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 1.5, 64)
    base = log_phi(s, 2.0, 3.0)
    t = shape_scale(base, target)
    assert ess(np.exp(t * base)) >= target - 1e-9
    assert ess(np.exp(t * 1.01 * base)) < target  # a sharper kernel would fall below it


def test_on_policy_batches_take_the_sharpest_kernel():
    assert shape_scale(np.zeros(16), 0.9) == T_MAX


def test_vespo_with_target_ess_reports_and_uses_the_scaled_shapes():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(32, 6, generator=g, dtype=torch.float64) * 3
    mu = lp + torch.randn(32, 6, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(32, 1, generator=g, dtype=torch.float64).expand(32, 6).clone()
    mask = torch.ones_like(lp)
    x = lp.clone().requires_grad_()
    loss, m = compute_loss("vespo", x, mu, adv, mask, VespoConfig(target_ess=0.7))
    loss.backward()
    assert m["vespo/ess"] >= 0.7 - 1e-6
    t = m["vespo/shape_scale"]
    assert m["vespo/k_pos"] == pytest.approx(2.0 * t) and m["vespo/lambda_neg"] == pytest.approx(2.0 * t)
    s = (lp - mu).sum(-1).numpy()
    pos = adv[:, 0].numpy() >= 0
    expected_phi = phi(s, np.where(pos, 2.0, 3.0) * t, np.where(pos, 3.0, 2.0) * t)
    expected = -torch.from_numpy(expected_phi).unsqueeze(-1) * adv / mask.sum()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-7)
    plain = compute_loss("vespo", lp, mu, adv, mask)[1]
    assert plain["vespo/ess"] < 0.7  # the released shapes are sharper than this batch affords


def test_invalid_target():
    with pytest.raises(ValueError, match="target_ess must be in"):
        VespoConfig(target_ess=1.5)
