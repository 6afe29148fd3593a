"""buffer.divergence_budget: the learner's KL by lag, the estimate and cap it gives, the buffer
applying that cap to eviction and admission, the config rule, and the controller in between."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import torch
from fakes import FakeEngine, FakeLearner, FakeLogger, assemble, fake_config, make_group, wait_until
from learner_fixtures import VOCAB, in_process_rank, save_tiny_llama

from buffer import BufferConfig, ReplayBuffer, Trajectory
from buffer.actor import _BufferActor
from buffer.divergence import DivergenceEstimate
from buffer.replay import SNAPSHOT_FILE
from configtypes import ConfigError
from learner.divergence_metrics import LagKL, k3_kl
from learner.sharding import merge_results
from learner.step_result import StepResult
from vespo.config import run_config

# -- the estimate -------------------------------------------------------------------------------


def estimate_of(*steps: dict[int, float], **kwargs) -> DivergenceEstimate:
    est = DivergenceEstimate(**kwargs)
    for by_lag in steps:
        est.observe(by_lag)
    return est


def test_with_nothing_measured_only_the_version_cap_holds():
    assert DivergenceEstimate().cap(0.01, 4) == 4
    assert estimate_of({}).cap(0.01, 4) == 4  # a step with no lag data measures nothing


def test_the_cap_is_the_largest_lag_within_the_budget():
    est = estimate_of({0: 0.001, 1: 0.01, 2: 0.02, 3: 0.04})
    assert est.cap(0.025, 8) == 2
    assert est.cap(0.015, 8) == 1
    assert est.cap(0.005, 8) == 0
    assert est.envelope(2) == pytest.approx(0.02)


def test_lags_past_the_measured_ones_are_extrapolated_through_the_origin():
    est = estimate_of({0: 0.001, 1: 0.01, 2: 0.02, 3: 0.04})
    assert est.estimate(6) == pytest.approx(0.08)  # 0.04 * 6 / 3
    assert est.cap(0.05, 8) == 3  # est(4) = 0.0533 is over
    assert est.cap(0.06, 8) == 4  # est(4) = 0.0533 within, est(5) = 0.0667 over
    gap = estimate_of({0: 0.0, 1: 0.01, 3: 0.01})
    assert gap.estimate(2) == pytest.approx(0.02)  # from lag 1, the nearest measured below
    assert gap.cap(0.015, 8) == 1


def test_a_lone_lag_0_says_nothing_about_older_data():
    est = estimate_of({0: 0.001})
    assert est.estimate(1) is None
    assert est.cap(0.01, 4) == 4
    assert estimate_of({0: 0.5}).cap(0.01, 4) == 0  # lag 0 itself over: only fresh data, never below 0


def test_a_dip_at_an_older_lag_does_not_admit_it():
    est = estimate_of({0: 0.001, 1: 0.05, 2: 0.001, 3: 0.001})
    assert est.cap(0.01, 4) == 0
    assert est.envelope(3) == pytest.approx(0.05)


def test_the_cap_never_exceeds_max_staleness():
    est = estimate_of({0: 0.0, 1: 1e-6, 2: 2e-6})
    assert est.cap(1.0, 3) == 3
    assert est.cap(1.0, 0) == 0


def test_the_moving_average_starts_at_the_first_measurement():
    est = estimate_of({1: 0.1})
    assert est.estimate(1) == pytest.approx(0.1)
    est.observe({1: 0.0})
    assert est.estimate(1) == pytest.approx(0.07)  # 0.1 + 0.3 * (0 - 0.1)
    est.observe({1: math.nan, 2: math.inf})  # skipped, not averaged in
    assert est.measured == pytest.approx({1: 0.07})


def test_a_lag_the_cap_keeps_out_is_forgotten_so_the_cap_can_reopen():
    est = estimate_of({0: 0.001, 1: 0.5}, max_age=3)
    assert est.cap(0.01, 4) == 0
    est.observe({0: 0.001})
    est.observe({0: 0.001})
    assert est.cap(0.01, 4) == 0  # lag 1 measured 2 steps ago: still known
    est.observe({0: 0.001})
    assert 1 not in est.measured and est.cap(0.01, 4) == 4


def test_given_the_cap_in_force_it_loosens_one_version_a_step_and_tightens_at_once():
    est = estimate_of({0: 0.001, 1: 0.004})  # lag L: 0.004 L, within 0.01 up to lag 2
    assert est.cap(0.01, 8) == 2
    assert est.cap(0.01, 8, last=0) == 1  # reopening: one version at a time
    assert est.cap(0.01, 8, last=1) == 2  # and no further than the budget allows
    assert est.cap(0.01, 8, last=6) == 2  # tightening: at once
    est = estimate_of({0: 0.001})
    assert est.cap(0.01, 8) == 8 and est.cap(0.01, 8, last=0) == 1  # nothing known above lag 0


def test_reset_forgets_everything():
    est = estimate_of({0: 0.5})
    est.reset()
    assert est.measured == {} and est.cap(0.01, 4) == 4


def test_ranks_merge_kl_by_lag_weighted_by_their_tokens():
    ranks = [StepResult({"actor/loss": 1.0}, {0: 0.01, 2: 0.5}, {0: 30.0, 2: 10.0}),
             StepResult({"actor/loss": 2.0}, {0: 0.03}, {0: 10.0})]  # fmt: skip
    merged = merge_results(ranks)
    assert merged.metrics == {"actor/loss": 3.0}
    assert merged.kl_by_lag == pytest.approx({0: 0.015, 2: 0.5}) and merged.tokens_by_lag == {0: 40.0, 2: 10.0}
    assert merged.dashboard() == pytest.approx({"actor/loss": 3.0, "divergence/kl_lag0": 0.015,
                                                "divergence/kl_lag2": 0.5})  # fmt: skip


# -- the learner's metric -----------------------------------------------------------------------


def test_k3_is_zero_on_policy_and_r_minus_1_minus_log_r_off_it():
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.1]]))
    assert torch.equal(k3_kl(lp, lp), torch.zeros_like(lp))
    got = k3_kl(lp + math.log(2.0), lp)
    torch.testing.assert_close(got, torch.full_like(lp, 1.0 - math.log(2.0)))
    assert k3_kl(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(math.expm1(20.0) - 20.0)
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_kl_is_binned_by_lag_over_response_tokens_and_micro_batches():
    acc = LagKL()
    blp = torch.zeros(2, 4)
    lp = torch.tensor([[0.0, 0.0, math.log(2.0), 9.0], [math.log(3.0), 0.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    versions = torch.tensor([[5, 5, 3, -1], [3, 3, -1, -1]])  # -1 off the response (masked: its 9.0 is ignored)
    acc.add(lp, blp, mask, 5 - versions)
    acc.add(torch.full((1, 2), math.log(2.0)), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[7, 7]]))
    k2, k3 = 1.0 - math.log(2.0), 2.0 - math.log(3.0)
    kl, tokens = acc.by_lag()
    assert kl == pytest.approx({0: 0.0, 2: (k2 + k3 + 0.0) / 3, 7: k2}) and tokens == {0: 2.0, 2: 3.0, 7: 2.0}
    assert LagKL().by_lag() == ({}, {})


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One in-process rank (world size 1) on a tiny random model."""
    from learner.config import LearnerConfig

    model_dir = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    with in_process_rank(LearnerConfig(model_path=model_dir, micro_batch_tokens=40)) as w:
        yield w


def mixed_version_trajectories() -> list[Trajectory]:
    """Rows sampled at versions 3 and 1, one a partial rollout of both."""
    rng = np.random.default_rng(0)
    versions = [[3] * 6, [1] * 5, [1, 1, 3, 3, 3], [3] * 4]
    return [Trajectory(traj_id=f"g/{i}", group_id="g", group_size=len(versions), prompt_ids=rng.integers(1, VOCAB, 4),
                       response_ids=rng.integers(1, VOCAB, len(v)),
                       behavior_logprobs=np.log(1.0 / VOCAB) + rng.normal(0, 0.3, len(v)),
                       token_versions=np.asarray(v), version_start=min(v), version_end=max(v), reward=float(i % 2))
            for i, v in enumerate(versions)]  # fmt: skip


def test_the_worker_reports_k3_kl_by_lag_against_the_sampler(worker):
    from learner.batching import collate
    from learner.sharding import batch_totals

    batch = collate(mixed_version_trajectories(), np.array([1.0, -1.0, 0.5, -0.5]))
    worker.step_count = 3  # the learner's version: lags 0 and 2
    lp = worker.compute_logprobs(batch)
    mask = batch.response_mask > 0
    kl = k3_kl(lp, batch.behavior_logprobs)
    lags = 3 - batch.token_versions
    want = {lag: float(kl[mask & (lags == lag)].mean()) for lag in (0, 2)}
    got = worker.evaluate_loss(batch, batch_totals(batch)).kl_by_lag
    assert got == pytest.approx(want, rel=1e-4)
    assert min(got.values()) > 0
    # with pi_old recomputed (mismatch correction) the divergence is still to the sampler's log-probs
    batch.old_logprobs = lp + 0.5
    assert worker.evaluate_loss(batch, batch_totals(batch)).kl_by_lag == pytest.approx(want, rel=1e-4)


# -- the buffer's dynamic cap -------------------------------------------------------------------


def test_a_dynamic_cap_drops_groups_the_version_cap_keeps():
    for cap, fresh in ((None, 2), (1, 1)):
        buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=4))
        buf.set_staleness_cap(cap)
        buf.put_many(make_group("old", 2, version=1) + make_group("new", 2, version=3))
        buf.put_many(make_group("partial", 3, version=1)[:2])
        batch = buf.get_batch(2, current_version=3, timeout=0, at_least=1)
        assert batch.num_groups == fresh
        m = buf.metrics()
        assert m["buffer/dropped_stale"] == (0 if cap is None else 4)  # "old" and the incomplete "partial"
        assert m["buffer/dropped_groups"] == (0 if cap is None else 2)
        assert m["buffer/staleness_cap"] == (4 if cap is None else 1)


def test_a_dynamic_cap_admits_fewer_groups_and_none_restores_the_version_cap():
    buf = ReplayBuffer(BufferConfig(max_staleness=4))  # one group per step (no run config)
    unlimited = ReplayBuffer(BufferConfig(max_staleness=4))
    buf.set_staleness_cap(1)
    assert buf.admit(0, 100) == 2 < unlimited.admit(0, 100) == 5
    buf.set_staleness_cap(None)
    assert buf.staleness_cap == 4 and buf.admit(0, 100) == 3
    buf.set_staleness_cap(9)  # max_staleness is the outer bound
    assert buf.staleness_cap == 4
    with pytest.raises(ValueError, match=">= 0"):
        buf.set_staleness_cap(-1)


def test_the_downweight_policy_counts_excess_past_the_dynamic_cap():
    buf = ReplayBuffer(BufferConfig(max_staleness=4, stale_policy="downweight", downweight_decay=0.5))
    buf.set_staleness_cap(1)
    buf.put_many(make_group("old", 2, version=0))
    assert buf.get_batch(1, current_version=3).weights == [0.25, 0.25]  # 0.5 ** (3 - 1)


def test_tightening_the_cap_wakes_a_waiting_learner_and_producer():
    buf = ReplayBuffer(BufferConfig(capacity=2, max_staleness=4))
    buf.put(make_group("stale", 2, version=0)[0])  # incomplete and holding the room
    got: list = []
    learner = threading.Thread(target=lambda: got.append(buf.get_batch(1, current_version=2, timeout=5)))
    producer = threading.Thread(target=lambda: buf.put_many(make_group("fresh", 2, version=2), timeout=5))
    learner.start()
    producer.start()
    wait_until(lambda: buf._incoming)  # the producer waits for room
    time.sleep(0.1)
    start = time.monotonic()
    buf.set_staleness_cap(1)  # "stale" is now over the cap: dropping it frees the room
    learner.join(5)
    producer.join(5)
    assert time.monotonic() - start < 2.0
    assert [t.group_id for t in got[0].trajectories] == ["fresh", "fresh"]
    assert buf.metrics()["buffer/dropped_stale"] == 1


def test_the_dynamic_cap_survives_a_snapshot(tmp_path):
    buf = ReplayBuffer(BufferConfig(max_staleness=4))
    buf.set_staleness_cap(1)
    buf.snapshot(tmp_path)
    assert ReplayBuffer.restore(tmp_path, buf.cfg).staleness_cap == 1
    assert _BufferActor(buf.cfg, str(tmp_path)).staleness_cap == 1  # what the Ray actor restores
    path = tmp_path / SNAPSHOT_FILE
    payload = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    del payload["staleness_cap"]  # a snapshot from before the dynamic cap
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))
    assert ReplayBuffer.restore(tmp_path, buf.cfg).staleness_cap == 4


# -- config -------------------------------------------------------------------------------------


def test_divergence_budget_is_for_async_mode_only():
    with pytest.raises(ConfigError, match=r"^buffer\.divergence_budget applies to async mode") as err:
        run_config.load(None, ["train.mode=sync", "buffer.divergence_budget=0.02"])
    assert "\n" not in str(err.value)
    assert run_config.load(None, ["buffer.divergence_budget=0.02"]).buffer.divergence_budget == 0.02
    assert run_config.load(None).buffer.divergence_budget is None
    with pytest.raises(ConfigError, match="buffer.divergence_budget must be > 0"):
        BufferConfig(divergence_budget=0)


# -- the controller -----------------------------------------------------------------------------


class DriftingLearner(FakeLearner):
    """Reports the same KL by lag every step, as a learner whose policy drifts that fast would."""

    def __init__(self, by_lag: dict[int, float]):
        super().__init__()
        self.by_lag = by_lag

    def train(self, batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult:
        return replace(super().train(batch, pad_id, recompute_old_logprobs), kl_by_lag=dict(self.by_lag))


class CountingBuffer(ReplayBuffer):
    def __init__(self, cfg: BufferConfig):
        super().__init__(cfg)
        self.caps_set: list[int | None] = []

    def set_staleness_cap(self, cap: int | None) -> None:
        self.caps_set.append(cap)
        super().set_staleness_cap(cap)


@pytest.mark.parametrize(("kl_lag1", "cap"), [(0.002, 4), (0.02, 2), (0.5, 0)])
def test_the_controller_sets_the_cap_the_measured_drift_allows(tmp_path, kl_lag1, cap):
    cfg = fake_config(tmp_path, "buffer.max_staleness=4", "buffer.divergence_budget=0.05")
    buf, logger = CountingBuffer(cfg.buffer), FakeLogger()
    controller = assemble(cfg, buf, [FakeEngine("engine-0", buf)], DriftingLearner({0: 0.001, 1: kl_lag1}), logger)
    summary = controller.run(checkpoint=False)
    assert summary.steps == cfg.train.steps
    assert buf.staleness_cap == cap and buf.caps_set == [cap]  # set once: it never changed after
    last = logger.metrics[-1]
    assert last["divergence/staleness_cap"] == cap and last["buffer/staleness_cap"] == cap
    assert last["divergence/kl_estimate_at_cap"] == pytest.approx(max(0.001, kl_lag1 * cap))


class SpikingLearner(FakeLearner):
    """Lag 0 within budget every step but the second, where one noisy batch reads far over it."""

    def train(self, batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult:
        result = super().train(batch, pad_id, recompute_old_logprobs)
        return replace(result, kl_by_lag={0: 0.5 if len(self.batches) == 2 else 0.001})


def test_after_a_spike_the_controller_reopens_the_cap_one_version_a_step(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=4", "buffer.divergence_budget=0.05", "train.steps=14")
    buf = CountingBuffer(cfg.buffer)
    assemble(cfg, buf, [FakeEngine("engine-0", buf)], SpikingLearner(), FakeLogger()).run(checkpoint=False)
    # nothing over budget: the version cap; the spike closes it; once lag 0's average is back
    # within budget nothing is known above lag 0, and the cap comes back one version at a time
    assert buf.caps_set == [4, 0, 1, 2, 3, 4]


def test_without_a_budget_the_controller_leaves_the_cap_alone(tmp_path):
    cfg = fake_config(tmp_path, "buffer.max_staleness=4")
    buf, logger = CountingBuffer(cfg.buffer), FakeLogger()
    controller = assemble(cfg, buf, [FakeEngine("engine-0", buf)], DriftingLearner({0: 0.001, 1: 0.5}), logger)
    controller.run(checkpoint=False)
    assert buf.caps_set == [] and buf.staleness_cap == 4
    assert "divergence/staleness_cap" not in logger.metrics[-1]
