"""The objective family against the spec: reference cases, properties, gradients, dtypes."""

from __future__ import annotations

import math

import numpy as np
import objective_reference as ref
import pytest
import torch

from learner.objectives import (
    AGG_MODES,
    OBJECTIVES,
    GrpoConfig,
    VespoConfig,
    compute_loss,
    make_config,
    phi,
    vespo_loss,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]])
LOGPI = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 1.0]]))


def random_batch(seed: int, b: int = 6, t: int = 9, spread: float = 0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    mu = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    lengths = torch.randint(1, t + 1, (b, 1), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths).to(torch.float64)
    return lp.to(dtype), mu.to(dtype), adv.to(dtype), mask.to(dtype)


def loss_and_grad(name, lp, mu, adv, mask, config=None, **kw):
    lp = lp.clone().requires_grad_()
    loss, metrics = compute_loss(name, lp, mu, adv, mask, config, **kw)
    loss.backward()
    return loss, lp.grad, metrics


# --- the spec's reference cases ------------------------------------------------------------


def test_reference_case_on_policy():
    loss, _, m = loss_and_grad("vespo", LOGPI, LOGPI, ADV, MASK)
    assert loss.item() == pytest.approx(0.415888, abs=1e-5)
    assert (m["vespo/W_pos_mean"], m["vespo/W_neg_mean"]) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert (m["vespo/phi_pos_mean"], m["vespo/phi_neg_mean"]) == pytest.approx((1.0, 1.0), abs=1e-6)


def test_reference_case_mixed_signs():
    mu = LOGPI.clone()
    mu[0, 0] -= 0.3
    mu[1, 1] += 0.4
    loss, _, m = loss_and_grad("vespo", LOGPI, mu, ADV, MASK)
    assert loss.item() == pytest.approx(0.272992, abs=1e-5)
    assert m["vespo/W_pos_mean"] == pytest.approx(1.349859, abs=1e-5)
    assert m["vespo/W_neg_mean"] == pytest.approx(0.670320, abs=1e-5)
    assert m["vespo/phi_pos_mean"] == pytest.approx(0.637898, abs=1e-5)
    assert m["vespo/phi_neg_mean"] == pytest.approx(0.582375, abs=1e-5)


def test_reference_case_extreme():
    mu = LOGPI.clone()
    mu[0] -= 10.0
    loss, grad, m = loss_and_grad("vespo", LOGPI, mu, ADV, MASK)
    assert loss.item() == pytest.approx(-0.138629, abs=1e-5)
    assert m["vespo/W_pos_mean"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert m["vespo/phi_pos_mean"] == 0.0
    assert m["vespo/phi_neg_mean"] == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()


# --- property 1 and 2: on-policy equals the policy gradient; the gradient formula ---------


@pytest.mark.parametrize("seed", range(3))
def test_on_policy_vespo_is_plain_policy_gradient(seed):
    lp, _, adv, mask = random_batch(seed)
    _, grad, m = loss_and_grad("vespo", lp, lp, adv, mask)
    assert m["vespo/W_min"] == m["vespo/W_max"] == 1.0
    assert m["vespo/phi_min"] == m["vespo/phi_max"] == 1.0
    torch.testing.assert_close(grad, -adv * mask / mask.sum())


@pytest.mark.parametrize("seed", range(5))
def test_vespo_gradient_is_minus_phi_a_m_over_token_count(seed):
    lp, mu, adv, mask = random_batch(seed, spread=0.4)
    _, grad, _ = loss_and_grad("vespo", lp, mu, adv, mask)
    s = (((lp - mu).double().clamp(-20, 20)) * mask).sum(-1).clamp(-20, 20)
    pos = (adv * mask).sum(-1) >= 0
    expected_phi = ref.vespo_phi(s, torch.where(pos, 2.0, 3.0).double(), torch.where(pos, 3.0, 2.0).double())
    expected = -expected_phi.unsqueeze(-1) * adv.double() * mask.double() / mask.sum()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


# --- property 3: no length normalisation ------------------------------------------------------


def test_repeating_a_response_squares_w():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.9]]))
    mu = lp - torch.tensor([[0.2, -0.1, 0.35]])
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    w1 = compute_loss("vespo", lp, mu, adv, mask)[1]["vespo/W_max"]
    doubled = [torch.cat([x, x], dim=1) for x in (lp, mu, adv, mask)]
    w2 = compute_loss("vespo", *doubled)[1]["vespo/W_max"]
    assert w2 == pytest.approx(w1**2, rel=1e-5)
    assert w1 == pytest.approx(math.exp(0.45), rel=1e-5)


def test_length_normalised_ablation_uses_the_geometric_mean():
    """The ablation (length_norm) is what property 3 rules out for VESPO proper: repeating a
    response leaves its weight unchanged, and W is exp(s / length)."""
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.9]]))
    mu = lp - torch.tensor([[0.2, -0.1, 0.35]])
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    cfg = {"length_norm": True}
    w1 = compute_loss("vespo", lp, mu, adv, mask, cfg)[1]["vespo/W_max"]
    doubled = [torch.cat([x, x], dim=1) for x in (lp, mu, adv, mask)]
    _, m2 = compute_loss("vespo", *doubled, cfg)
    assert w1 == pytest.approx(math.exp(0.45 / 3), rel=1e-5)
    assert m2["vespo/W_max"] == pytest.approx(w1, rel=1e-5)
    assert m2["vespo/phi_max"] == pytest.approx(phi(math.log(w1), 2.0, 3.0).item(), rel=1e-5)
    # the objective-independent weight metric still reports the true sequence weight
    assert m2["actor/seq_w_max"] == pytest.approx(math.exp(0.9), rel=1e-5)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_reports_the_true_sequence_weight(name):
    lp, mu, adv, mask = random_batch(4, spread=1.0)
    w = torch.exp(((lp - mu) * mask).sum(-1))
    _, m = compute_loss(name, lp, mu, adv, mask)
    assert m["actor/seq_w_max"] == pytest.approx(w.max().item(), rel=1e-5)
    assert m["actor/seq_w_mean"] == pytest.approx(w.mean().item(), rel=1e-5)


# --- property 4: extremes, masked rows, empty batches -----------------------------------------


@pytest.mark.parametrize("name", OBJECTIVES)
def test_extreme_weights_stay_finite(name):
    lp, mu, adv, mask = random_batch(7)
    mu = lp - 50.0 * torch.sign(torch.randn_like(lp))  # per-token log-ratios of +-50, clamped
    loss, grad, metrics = loss_and_grad(name, lp, mu, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


def test_vespo_weight_at_clamp_gives_zero_phi():
    assert phi(20.0, 2.0, 3.0) == 0.0
    assert phi(1e9, 2.0, 3.0) == 0.0  # clamped to 20 first
    assert phi(float("nan"), 2.0, 3.0) == 0.0


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_fully_masked_rows_contribute_nothing(name, agg):
    lp, mu, adv, mask = random_batch(3)
    config = make_config(name, {"agg": agg})
    base_loss, base_grad, _ = loss_and_grad(name, lp, mu, adv, mask, config)
    g = torch.Generator().manual_seed(11)
    extra = [-torch.rand(2, lp.shape[1], generator=g) * 5 for _ in range(2)]
    lp2 = torch.cat([lp, extra[0]])
    mu2 = torch.cat([mu, extra[1]])
    adv2 = torch.cat([adv, torch.full((2, lp.shape[1]), -3.0)])
    mask2 = torch.cat([mask, torch.zeros(2, lp.shape[1])])
    loss, grad, _ = loss_and_grad(name, lp2, mu2, adv2, mask2, config)
    torch.testing.assert_close(loss, base_loss)
    torch.testing.assert_close(grad[: lp.shape[0]], base_grad)
    assert (grad[lp.shape[0] :] == 0).all()


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_batch_gives_zero_loss(name, agg):
    lp, mu, adv, _ = random_batch(4)
    loss, grad, metrics = loss_and_grad(name, lp, mu, adv, torch.zeros_like(lp), make_config(name, {"agg": agg}))
    assert loss.item() == 0.0
    assert (grad == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", OBJECTIVES)
def test_empty_token_dimension(name):
    empty = torch.zeros(3, 0)
    loss, grad, _ = loss_and_grad(name, empty, empty, empty, empty)
    assert loss.item() == 0.0 and grad.shape == (3, 0)


# --- property 5: the kernel's shape ------------------------------------------------------------


@pytest.mark.parametrize(("k", "lam"), [(2.0, 3.0), (3.0, 2.0), (1.0, 1.0), (0.5, 4.0)])
def test_phi_peaks_at_k_over_lambda_and_is_continuous(k, lam):
    w = np.linspace(1e-3, 6.0, 20001)
    values = phi(np.log(w), k, lam)
    peak = phi(math.log(k / lam), k, lam)
    assert values.max() <= peak + 1e-12
    assert w[values.argmax()] == pytest.approx(k / lam, abs=1e-3)
    assert phi(0.0, k, lam) == pytest.approx(1.0)
    s = np.linspace(-8.0, 3.0, 1001)  # continuity: a tiny step in s moves phi by a tiny amount
    assert np.abs(phi(s + 1e-9, k, lam) - phi(s, k, lam)).max() < 1e-6


def test_sign_of_advantage_picks_the_shape():
    cfg = VespoConfig(k_pos=1.0, lambda_pos=4.0, k_neg=5.0, lambda_neg=0.5)
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    mu = lp - 0.25  # s = 0.5 on every row
    adv = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]])
    _, m = compute_loss("vespo", lp, mu, adv, torch.ones_like(lp), cfg)
    assert m["vespo/phi_pos_mean"] == pytest.approx(float(phi(0.5, 1.0, 4.0)), rel=1e-6)  # A = 0 counts as >= 0
    assert m["vespo/phi_neg_mean"] == pytest.approx(float(phi(0.5, 5.0, 0.5)), rel=1e-6)
    assert (m["vespo/n_pos"], m["vespo/n_neg"]) == (2.0, 1.0)


def test_lambda_is_floored():
    assert phi(0.3, 2.0, 0.0) == pytest.approx(float(phi(0.3, 2.0, 1e-4)))


# --- every objective against the naive reference: values and autograd gradients -------------


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_values_and_gradients(name, agg, seed):
    lp, mu, adv, mask = random_batch(seed, spread=0.3, dtype=torch.float64)
    loss, grad, _ = loss_and_grad(name, lp, mu, adv, mask, make_config(name, {"agg": agg}))
    lp_ref = lp.clone().requires_grad_()
    ref_loss = ref.REFERENCE[name](lp_ref, mu, adv, mask, agg=agg)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, lp_ref.grad, rtol=1e-4, atol=1e-6)


def test_grpo_dual_clip_can_be_switched_off():
    lp, mu, adv, mask = random_batch(5, spread=2.0, dtype=torch.float64)
    for c in (None, 3.0, 1.5):
        loss, _, _ = loss_and_grad("grpo", lp, mu, adv, mask, GrpoConfig(dual_clip=c))
        assert loss.item() == pytest.approx(ref.grpo(lp, mu, adv, mask, dual_clip=c).item(), rel=1e-5)
    on = loss_and_grad("grpo", lp, mu, adv, mask, GrpoConfig(dual_clip=1.5))[0]
    off = loss_and_grad("grpo", lp, mu, adv, mask, GrpoConfig(dual_clip=None))[0]
    assert on.item() != pytest.approx(off.item())


def test_vespo_mismatch_correction_moves_w_to_the_sampler():
    lp, mu, adv, mask = random_batch(8, spread=0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    rho = torch.exp(torch.randn(lp.shape, generator=g, dtype=torch.float64) * 0.1)
    loss, grad, m = loss_and_grad("vespo", lp, mu, adv, mask, rollout_is_weights=rho)
    lp_ref = lp.clone().requires_grad_()
    ref_loss, w_ref, _ = ref.vespo(lp_ref, mu, adv, mask, rho=rho)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, lp_ref.grad, rtol=1e-4, atol=1e-6)
    assert m["vespo/W_max"] == pytest.approx(w_ref.max().item(), rel=1e-5)
    expected_shift = (torch.log(rho) * mask).sum(-1)
    assert m["vespo/mismatch_s_mean"] == pytest.approx(expected_shift.mean().item(), rel=1e-5)
    # rho = 1 everywhere is no correction at all
    same = compute_loss("vespo", lp, mu, adv, mask, rollout_is_weights=torch.ones_like(lp))[0]
    assert same.item() == pytest.approx(compute_loss("vespo", lp, mu, adv, mask)[0].item(), rel=1e-6)


def test_vespo_loss_keyword_form_matches_compute_loss():
    lp, mu, adv, mask = random_batch(9)
    a, _ = vespo_loss(lp, mu, adv, mask, k_pos=1.5, lambda_pos=2.5, k_neg=2.0, lambda_neg=1.0, agg="seq-mean-token-sum")
    cfg = VespoConfig(k_pos=1.5, lambda_pos=2.5, k_neg=2.0, lambda_neg=1.0, agg="seq-mean-token-sum")
    b, _ = compute_loss("vespo", lp, mu, adv, mask, cfg)
    assert a.item() == b.item()


# --- property 6: shapes, dtypes, metrics ----------------------------------------------------------


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_shapes_and_metrics(name, dtype):
    lp, mu, adv, mask = random_batch(6, dtype=dtype)
    loss, grad, metrics = loss_and_grad(name, lp, mu, adv, mask)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == lp.shape and torch.isfinite(grad).all()
    assert metrics and all(type(v) is float for v in metrics.values())
    assert {"actor/pg_loss", "actor/ppo_kl"} <= metrics.keys()
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item())


def test_bfloat16_agrees_with_float32():
    lp, mu, adv, mask = random_batch(10)
    full = compute_loss("vespo", lp, mu, adv, mask)[0]
    half = compute_loss("vespo", *(x.bfloat16() for x in (lp, mu, adv, mask)))[0]
    assert half.item() == pytest.approx(full.item(), rel=5e-2, abs=5e-3)


def test_vespo_metrics_cover_the_spec_list():
    lp, mu, adv, mask = random_batch(12, spread=1.0)
    _, m = compute_loss("vespo", lp, mu, adv, mask)
    for stat in ("mean", "max", "min", "std"):
        assert f"vespo/W_{stat}" in m
    for key in ("s_mean", "s_max", "s_min", "phi_mean", "phi_max", "phi_min", "k_pos", "lambda_pos", "k_neg"):
        assert f"vespo/{key}" in m
    for key in ("W_pos_mean", "W_neg_mean", "phi_pos_mean", "phi_neg_mean", "n_pos", "n_neg"):
        assert f"vespo/{key}" in m
    assert {"vespo/n_neg_high_W", "vespo/W_neg_high_max", "actor/ppo_kl"} <= m.keys()
    assert m["vespo/n_pos"] + m["vespo/n_neg"] == lp.shape[0]
    s = ((lp - mu) * mask).sum(-1)
    assert m["actor/ppo_kl"] == pytest.approx(-(s / mask.sum(-1)).mean().item(), rel=1e-5)


# --- errors a user sees ---------------------------------------------------------------------------


def test_clear_errors():
    lp, mu, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="unknown objective 'ppo'.*vespo"):
        compute_loss("ppo", lp, mu, adv, mask)
    with pytest.raises(ValueError, match=r"unknown vespo option\(s\) \['kpos'\]"):
        compute_loss("vespo", lp, mu, adv, mask, {"kpos": 1.0})
    with pytest.raises(ValueError, match="k_pos must be >= 0"):
        VespoConfig(k_pos=-1.0)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        VespoConfig(agg="mean")
    with pytest.raises(ValueError, match="mask has shape"):
        compute_loss("vespo", lp, mu, adv, mask[:, :-1])
    with pytest.raises(TypeError, match="must be VespoConfig"):
        compute_loss("vespo", lp, mu, adv, mask, GrpoConfig())


@pytest.mark.parametrize(("name", "config"), [("vespo", VespoConfig(fused=False)), ("cispo", None)])
def test_second_backward_through_an_eager_linear_loss_is_refused(name, config):
    lp, mu, adv, mask = random_batch(1)
    lp.requires_grad_()
    loss, _ = compute_loss(name, lp, mu, adv, mask, config)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


@pytest.mark.parametrize("shape", [(6, 9), (1, 7), (5, 1), (1, 1), (3, 0), (0, 4)])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_fused_and_eager_vespo_agree(shape, agg):
    g = torch.Generator().manual_seed(sum(shape))
    lp = -torch.rand(shape, generator=g) * 3
    mu = lp + torch.randn(shape, generator=g) * 0.5
    adv = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    results = []
    for fused in (True, False):
        loss, grad, metrics = loss_and_grad("vespo", lp, mu, adv, mask, VespoConfig(agg=agg, fused=fused))
        results.append((loss, grad, metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-6), key


def test_fused_kernels_compiled_on_a_tiny_batch_stay_parallel():
    # The inductor cache is shared by every process on the machine and keys these dynamic
    # graphs by symbolic shapes, so whatever the first (here tiny) batch compiles is what a
    # large batch in another process runs: it must not be a single-threaded loop.
    from torch._inductor.utils import run_and_get_code

    from learner.objectives import fused

    lp, mu, adv, mask = random_batch(0, b=2, t=3)
    calls = [
        (fused.token_sums, (lp, mu, adv, mask)),
        (fused.scaled_advantages, (adv, mask, torch.ones(2))),
    ]
    for fn, args in calls:
        path = fused.CompiledOrEager(fn)  # a fresh compile with the fused path's settings
        with torch.no_grad():
            _, codes = run_and_get_code(path, *args)
        if not path.active:
            pytest.skip("torch.compile unavailable here")
        assert codes and all("#pragma omp parallel" in code for code in codes), fn.__name__


def test_fused_path_falls_back_to_eager_only_when_compiling_fails(monkeypatch):
    from learner.objectives import fused

    def broken(*args):  # a lazy compile that fails at the first call, e.g. no C++ compiler
        raise RuntimeError("no working C++ compiler")

    lp, mu, adv, mask = random_batch(1)
    path = fused.CompiledOrEager(fused.token_sums)
    monkeypatch.setattr(path, "impl", broken)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="size of tensor"):  # bad inputs: eager fails too
            path(lp, mu[:, :-1], adv, mask)
        assert path.active
        torch.testing.assert_close(path(lp, mu, adv, mask), fused.token_sums(lp, mu, adv, mask), rtol=0, atol=0)
    assert not path.active
