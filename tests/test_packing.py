"""Sequence packing in the learner: the same numbers as the padded path, on fewer positions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from learner_fixtures import VOCAB, in_process_rank, save_tiny_llama
from transformers import AutoModelForCausalLM

from buffer.trajectory import Trajectory
from configtypes import ConfigError
from learner.batching import TrainBatch, collate, micro_batches
from learner.config import LearnerConfig
from learner.logprobs import token_logprobs
from learner.packing import micro_batches_of, packed_cost, packed_token_logprobs, padded_cost, plan
from learner.sharding import batch_totals

# very different lengths: a few long sequences among short ones, one of a single response token
LENGTHS = [120, 3, 17, 64, 5, 90, 9, 2, 33, 111, 4, 48]


def trajectories(lengths: list[int], seed: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        p = min(4, n - 1)
        r = n - p
        out.append(
            Trajectory(
                traj_id=str(i), group_id=str(i // 4), group_size=4,
                prompt_ids=rng.integers(1, VOCAB, p), response_ids=rng.integers(1, VOCAB, r),
                behavior_logprobs=np.log(1.0 / VOCAB) + rng.normal(0, 0.05, r),
                token_versions=np.zeros(r), version_start=0, version_end=0, reward=float(i % 2),
            )
        )  # fmt: skip
    return out


def make_batch(lengths: list[int] = LENGTHS, seed: int = 0) -> TrainBatch:
    adv = np.random.default_rng(seed + 1).normal(size=len(lengths))
    return collate(trajectories(lengths, seed), adv)


def valid_columns(batch: TrainBatch) -> torch.Tensor:
    """Columns of the (B, L-1) layout that predict a real token: the rest is padding."""
    n = batch.attention_mask.sum(-1, keepdim=True)
    return torch.arange(batch.input_ids.shape[1] - 1) < n - 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def scored(model, batch: TrainBatch, budget: int, packed: bool, temperature: float = 1.0) -> torch.Tensor:
    """(B, L-1) log-probs, micro-batch by micro-batch, as the worker assembles them."""
    out = torch.zeros_like(batch.behavior_logprobs)
    for rows, micro, layout in micro_batches_of(batch, budget, packed):
        if layout is None:
            lp = token_logprobs(model, micro.input_ids, micro.attention_mask, temperature)
        else:
            lp = packed_token_logprobs(model, layout, temperature)
        out[torch.tensor(rows).unsqueeze(-1), torch.arange(lp.shape[1])] = lp
    return out


@pytest.mark.parametrize("budget", [128, 300, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_equal_the_padded_ones(model, budget, temperature):
    batch = make_batch()
    assert any(len(row) > 1 for mb in plan(batch.attention_mask.sum(-1).tolist(), budget) for row in mb)
    with torch.no_grad():
        padded = scored(model, batch, budget, packed=False, temperature=temperature)
        packed = scored(model, batch, budget, packed=True, temperature=temperature)
        whole = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature)  # one padded forward
    valid = valid_columns(batch)
    torch.testing.assert_close(packed[valid], whole[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[valid], padded[valid], rtol=0, atol=1e-5)
    assert (packed[~valid] == 0).all()  # off the sequences: a finite placeholder, masked downstream


def test_packed_sequences_do_not_see_each_other(model):
    """Changing one sequence leaves the log-probs of the sequences packed beside it unchanged."""
    batch = make_batch()
    budget = 300
    assert any(0 in row and len(row) > 1 for mb in plan(batch.attention_mask.sum(-1).tolist(), budget) for row in mb)
    changed = batch.map(lambda t: t.clone())
    changed.input_ids[0, 1:120] = (changed.input_ids[0, 1:120] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a, b = scored(model, batch, budget, True), scored(model, changed, budget, True)
    valid = valid_columns(batch)
    torch.testing.assert_close(a[1:][valid[1:]], b[1:][valid[1:]], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0][valid[0]], b[0][valid[0]])


def test_packed_gradients_equal_the_padded_ones(model_dir):
    batch = make_batch()
    weights = torch.randn(batch.behavior_logprobs.shape, generator=torch.Generator().manual_seed(0))
    weights = weights * batch.response_mask
    grads = []
    for packed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        (scored(model, batch, 300, packed) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 600), min_size=0, max_size=60),
    budget=st.integers(1, 2048),
)
def test_the_planner_keeps_the_budget_and_every_sequence_once(lengths, budget):
    micro = plan(lengths, budget)
    seen = [i for mb in micro for row in mb for i in row]
    assert sorted(seen) == list(range(len(lengths)))
    for mb in micro:
        cost = packed_cost(lengths, [mb])
        alone = len(mb) == 1 and len(mb[0]) == 1
        assert cost <= budget or (alone and lengths[mb[0][0]] > budget)


def test_micro_batches_cover_the_batch_and_the_option_switches_the_layout():
    batch = make_batch()
    lengths = batch.attention_mask.sum(-1).tolist()
    padded = list(micro_batches_of(batch, 300, packed=False))
    packed = list(micro_batches_of(batch, 300, packed=True))
    # off: the old padded micro-batches, row for row, and nothing packed
    assert [rows for rows, _, _ in padded] == micro_batches(lengths, 300)
    assert all(layout is None for _, _, layout in padded)
    for parts in (padded, packed):
        assert sorted(i for rows, _, _ in parts for i in rows) == list(range(batch.num_rows))
        for rows, micro, _ in parts:  # the padded layout of those rows, which the objectives consume
            cols = micro.input_ids.shape[1] - 1
            torch.testing.assert_close(micro.response_mask, batch.rows(rows).response_mask[:, :cols])
    computed_padded = sum(micro.input_ids.numel() for _, micro, _ in padded)
    computed_packed = sum(layout.computed_tokens for _, _, layout in packed)
    assert computed_padded == padded_cost(lengths, micro_batches(lengths, 300))
    assert computed_packed == packed_cost(lengths, plan(lengths, 300))
    assert computed_packed < 0.8 * computed_padded
    assert computed_packed <= 300 * len(packed)


def test_pack_sequences_is_on_by_default_and_validated():
    assert LearnerConfig().pack_sequences is True
    assert LearnerConfig(pack_sequences=False).pack_sequences is False
    with pytest.raises(ConfigError, match="learner.pack_sequences: expected true or false, got 'maybe'"):
        LearnerConfig(pack_sequences="maybe")


@pytest.fixture
def worker(model_dir):
    """One in-process rank (world size 1): it forms and leaves its own process group."""
    with in_process_rank(LearnerConfig(model_path=model_dir, lr=1e-3, micro_batch_tokens=300)) as w:
        yield w


# Adam's first step moves a weight by lr * g / (|g| + eps), whose slope in g is at most lr / eps.
# Packed and padded paths sum the same gradient in another order (another CPU: another order
# again), so their gradients differ by float32 rounding, bounded here by GRAD_RTOL * ||g||, and
# their weights by lr / eps * GRAD_RTOL * ||g||. With Adam's usual eps of 1e-8 a gradient near
# 1e-8 may move its weight by anything up to lr, so the comparison uses a larger eps.
ADAM_EPS = 1e-3
GRAD_RTOL = 1e-5


def test_a_worker_step_is_the_same_packed_and_padded(worker):
    batch = make_batch()
    totals = batch_totals(batch)
    results = {}
    for budget in (300, 4096):  # several micro-batches (grouped differently), then one each
        for packed in (True, False):
            worker.rebuild(replace(worker.cfg, micro_batch_tokens=budget, pack_sequences=packed, eps=ADAM_EPS))
            old = worker.compute_logprobs(batch)
            metrics = worker.train_step(batch, totals).metrics
            results[budget, packed] = old, metrics, worker.full_state_dict()
    valid = valid_columns(batch)
    for budget in (300, 4096):
        (old_p, m_p, w_p), (old_u, m_u, w_u) = results[budget, True], results[budget, False]
        torch.testing.assert_close(old_p[valid], old_u[valid], rtol=0, atol=1e-5)
        assert m_p["actor/loss"] == pytest.approx(m_u["actor/loss"], rel=1e-5, abs=1e-7)
        assert m_p["actor/grad_norm"] == pytest.approx(m_u["actor/grad_norm"], rel=1e-4)
        assert m_p["perf/padding_frac"] < m_u["perf/padding_frac"]
        step_atol = worker.cfg.lr / ADAM_EPS * GRAD_RTOL * max(m_u["actor/grad_norm"], m_p["actor/grad_norm"])
        for name, value in w_u.items():
            torch.testing.assert_close(w_p[name], value, rtol=0, atol=step_atol, msg=name)
        # token means and extremes do not depend on how rows are grouped into micro-batches;
        # with one micro-batch per path every metric is the same
        keys = [k for k in m_u if not k.startswith("perf/")]
        if budget == 300:
            keys = [
                k for k in keys if k.endswith(("_max", "_min")) or k.startswith("staleness/") or k == "actor/entropy"
            ]
        assert keys and m_p.keys() == m_u.keys()
        for k in keys:
            assert m_p[k] == pytest.approx(m_u[k], rel=1e-4, abs=1e-6), k
    assert results[300, True][1]["actor/loss"] == pytest.approx(results[4096, True][1]["actor/loss"], rel=1e-5)
