"""The real controller, fleet, sources, weight sync and buffer on a small simulated layout
(bench.sim_*: 4 engines, 2 learner ranks, a cost model scaled down to seconds a step): the
staleness rules hold in both modes, async beats sync when generating a batch takes about as
long as training on it, and the remote calls per step are the ones the design makes."""

from __future__ import annotations

import dataclasses
import time

import pytest

from bench.sim_model import CostModel
from bench.sim_run import Layout, simulate
from vespo.orchestration import sources

ENGINES, STEPS, GROUPS = 4, 6, 8


def small_model() -> CostModel:
    """Responses of a few hundred tokens: generating a step's 8 groups x 4 takes ~3 s on 4
    engines, and training on them ~3 s on 2 ranks."""
    return CostModel(length_median=200, sigma_prompt=0.3, sigma_sample=0.4, max_response=1024, prompt_tokens=50,
                     train_tokens_s_per_rank=1700.0, train_overhead_s=0.5, broadcast_s=0.3)  # fmt: skip


def run(mode: str, **kw):
    layout = Layout(mode, engines=ENGINES, ranks=2, groups_per_step=GROUPS, n=4, steps=STEPS, scale=0,
                    warmup_steps=2, **kw)  # fmt: skip
    return simulate(layout, small_model())


@pytest.fixture(scope="module")
def sync1():
    return run("sync")


@pytest.fixture(scope="module")
def async2():
    return run("async", max_staleness=2)


def test_async_trains_nothing_staler_than_the_cap_and_does_overlap(async2):
    staleness = async2.staleness()
    assert async2.steps == STEPS and sum(staleness.values()) == STEPS * GROUPS * 4
    assert max(staleness) <= 2
    assert any(s > 0 for s in staleness), "async never trained on data older than the current weights"


def test_sync_trains_each_round_at_staleness_0_to_n_minus_1():
    result = run("sync", staleness_ratio=2)
    assert [set(r.staleness) for r in result.train] == [{i % 2} for i in range(STEPS)]
    assert result.generated_groups == STEPS * GROUPS  # a round generates exactly its N batches


def test_async_beats_sync_when_generation_and_training_take_as_long(sync1, async2):
    assert set(sync1.staleness()) == {0}
    train_s = sum(r.end - r.start for r in sync1.train) / sync1.steps
    assert 0.5 < (sync1.step_s - train_s) / train_s < 2.0  # generating a batch ~ training on it
    assert async2.step_s < 0.8 * sync1.step_s
    assert async2.learner_idle < sync1.learner_idle


def test_sync_makes_the_remote_calls_the_design_says(sync1):
    calls = sync1.calls_per_step()
    assert calls["learner.train"] == calls["learner.broadcast_weights"] == 1  # a round of N=1: one update, one publish
    assert calls["engine.receive_weights"] == calls["engine.stats"] == ENGINES
    assert calls["buffer.metrics"] == calls["buffer.seen_groups"] == calls["learner.refused"] == 1
    # the round's prompts are spread over every engine at once: one admission and one submit each
    assert calls["buffer.admit"] == calls["engine.submit"] == ENGINES
    assert (calls["engine.poll"] * STEPS) % ENGINES == 0  # every feed polls each engine once
    assert calls["engine.poll"] == ENGINES * calls["buffer.get_batch"]  # a feed before each look at the buffer
    assert sync1.generated_groups == STEPS * GROUPS and not sync1.calls["feeder"]


def test_async_makes_the_remote_calls_the_design_says(async2):
    calls, loop = async2.calls_per_step(), async2.calls_per_step("loop")
    assert calls["learner.train"] == calls["learner.broadcast_weights"] == 1  # train.sync_every=1
    assert calls["engine.receive_weights"] == calls["engine.stats"] == ENGINES
    assert not {"engine.poll", "buffer.admit", "engine.submit"} & set(loop)  # feeding is the feeder's
    rounds = async2.calls["feeder"]["engine.poll"] / ENGINES
    assert rounds == int(rounds)  # each round polls every engine once
    # once the buffer's admission refuses, the rest of the round asks it nothing: at most one
    # refused admission a round, however many engines have room
    assert async2.refused_admits <= rounds
    assert async2.calls["feeder"]["buffer.admit"] <= rounds + async2.calls["feeder"]["engine.submit"]


def test_the_controller_is_charged_its_own_cpu_and_its_clock_is_restored(async2):
    assert async2.own_cpu_s["loop"] > 0 and async2.own_cpu_s["feeder"] > 0
    assert async2.sim_cpu_s > 0 and async2.buffer_cpu_s > 0
    assert sources.time is time  # the controller's modules read the real clock again
    # the controller's own accounting ran on the simulated clock: its wall time is the steps'
    assert async2.summary.wall_s == pytest.approx(async2.train[-1].end, rel=0.05)


def test_a_divergence_budget_caps_staleness_by_the_drift_the_learner_reports():
    """buffer.divergence_budget in the simulation: the simulated learner reports KL by lag from
    the cost model's drift, and the real controller and buffer turn a budget into a cap. With
    drift 0.01 a version, a budget of 0.015 allows lag 1 only; a budget of 1 allows the version
    cap. Nothing else differs between the two runs."""
    model = dataclasses.replace(small_model(), kl_mismatch=0.0, kl_per_version=0.01, kl_noise_sigma=0.0)

    def run_budget(budget: float):
        layout = Layout("async", engines=ENGINES, ranks=2, groups_per_step=GROUPS, n=4, steps=10, scale=0,
                        warmup_steps=2, max_staleness=3, divergence_budget=budget)  # fmt: skip
        return simulate(layout, model)

    tight, loose = run_budget(0.015), run_budget(1.0)
    assert tight.layout.label == "async KL 0.015"
    caps = tight.caps_in_force()
    assert caps[0] == 3 and min(caps) == 1  # the version cap until a lag over budget is measured
    for record, cap in zip(tight.train, caps, strict=True):
        assert max(record.staleness) <= cap
    assert max(tight.staleness()) <= 3 and max(s for r in tight.train[-4:] for s in r.staleness) <= 1
    assert set(loose.caps_in_force()) == {3}
    assert max(loose.staleness()) >= 2  # the looser rule does train on older data


def test_the_dense_profile_is_the_default_cost_model():
    from vespo.config.model_profile import QWEN25_7B

    model = CostModel.of(QWEN25_7B, ranks=16)
    assert model == CostModel() and model.describe() == CostModel().describe()
    assert model.experts_s(256) == 0.0


def test_an_moe_is_stored_and_sent_whole_but_computed_by_its_active_parameters():
    from vespo.config.model_profile import QWEN3_30B_A3B as moe
    from vespo.config.model_profile import train_flops

    # the model card's "30.5B in total and 3.3B activated", from the config's shape
    assert moe.params == pytest.approx(30.5e9, rel=0.01) and moe.active_params == pytest.approx(3.3e9, rel=0.03)
    assert moe.weight_bytes == 2 * moe.params  # a broadcast sends every expert
    assert train_flops(moe, 1000) == 6 * moe.active_params * 1000
    # one sequence's decode step reads the active weights; 64 sequences touch nearly every expert
    assert moe.decode_bytes(1) == pytest.approx(2 * moe.active_params)
    assert moe.experts_read(1) == pytest.approx(8) and moe.experts_read(64) > 0.98 * moe.experts
    assert moe.decode_bytes(256) == pytest.approx(moe.weight_bytes, rel=1e-3)
    model = CostModel.of(moe, ranks=16)
    assert model.decode_base_s + model.experts_s(1) == pytest.approx(2 * moe.active_params / model.hbm_bytes_s)
    assert model.per_seq_s > 2 * moe.active_params / model.decode_flops_s  # FLOPs of the active parameters


def test_zero_shards_learner_memory_over_the_ranks():
    from vespo.config.model_profile import QWEN3_30B_A3B as moe
    from vespo.config.model_profile import state_bytes

    per_rank = [sum(state_bytes(moe, 3, ranks).values()) for ranks in (8, 16, 48)]
    assert per_rank[0] > per_rank[1] > per_rank[2]
    # 16 bytes a parameter split over 16 ranks, plus what ZeRO-3 keeps gathered (1e9 bf16 parameters)
    assert per_rank[1] == pytest.approx(moe.params + 2e9)
    at_stage_2 = state_bytes(moe, 2, 16)
    assert at_stage_2["weights"] == 2 * moe.params and at_stage_2["grads"] == 2 * moe.params / 16


def test_a_lora_adapter_is_what_syncs_and_trains():
    """learner.lora on a profile: a sync carries rank x (in + out) values of each target in each
    layer, in the learner's dtype; the frozen base keeps only its weights, so memory drops."""
    from learner.config import LLAMA_PROJECTIONS
    from vespo.config.model_profile import QWEN3_30B_A3B as moe
    from vespo.config.model_profile import QWEN25_7B as dense
    from vespo.config.model_profile import Adapter, ranks_needed, state_bytes

    a = Adapter.of(dense, 8, LLAMA_PROJECTIONS)
    # Qwen2.5-7B: hidden 3584, q 28 x 128, k and v 4 x 128, MLP 18944; 28 layers
    per_layer = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 3 * (3584 + 18944)
    assert a.params == 28 * 8 * per_layer == 20_185_088 and not a.missed
    assert a.sync_bytes(bf16=True) == 2 * a.params and a.sync_bytes(bf16=False) == 4 * a.params
    # the experts of Qwen3-30B-A3B are fused parameters: the MLP names reach nothing, attention does
    b = Adapter.of(moe, 16, ["self_attn.q_proj", *LLAMA_PROJECTIONS[1:]])
    assert b.reached == ["q_proj", "k_proj", "v_proj", "o_proj"] and b.missed == ["gate_proj", "up_proj", "down_proj"]
    assert b.params == 48 * 16 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048)) == 13_369_344
    assert b.sync_bytes() < moe.weight_bytes / 2000

    full, lora = state_bytes(moe, 3, 16), state_bytes(moe, 3, 16, adapter=b)
    assert lora["frozen weights"] == full["weights"] == 2 * moe.params / 16  # base weights still sharded
    assert lora["Adam"] == 8 * b.params / 16 and lora["grads"] == 2 * b.params / 16  # moments and grads: adapter's
    assert sum(lora.values()) < sum(full.values()) / 5
    assert ranks_needed(moe, 3, True, 8192, b) == 2 and ranks_needed(moe, 3, True, 8192) == 15
    assert ranks_needed(moe, 3, True, 16384) is None  # activations alone are over 80 GB


def test_the_simulator_syncs_only_the_adapter_under_lora():
    from bench.simulate import lora_cost_model
    from vespo.config.model_profile import QWEN3_30B_A3B as moe
    from vespo.config.model_profile import Adapter

    full = CostModel.of(moe, ranks=16)
    lora = lora_cost_model(full, Adapter.of(moe, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]), ranks=16)
    assert lora.broadcast_s < full.broadcast_s / 1000
    # ZeRO-3 still gathers every weight twice, but reduce-scatters only the adapter's grads
    assert lora.train_tokens_s_per_rank == pytest.approx(1.5 * full.train_tokens_s_per_rank, rel=1e-3)
