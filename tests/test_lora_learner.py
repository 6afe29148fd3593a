"""LoRA training (learner.lora): only the adapter trains, and the weights that leave the learner
are the base model's, by its names and shapes, with the adapter merged in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from learner_fixtures import in_process_rank, save_tiny_llama, synthetic_trajectories
from transformers import AutoModelForCausalLM

from configtypes import ConfigError
from learner import lora
from learner.advantages import advantages
from learner.batching import TrainBatch, collate
from learner.config import LearnerConfig, LoraConfig
from learner.objectives import OBJECTIVES
from learner.sharding import batch_totals
from vespo.config import run_config
from vespo.config.preflight import PreflightError, check
from weightsync.transport import TensorSpec, plan_buckets, plan_to_wire

LORA = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def make_batch() -> TrainBatch:
    trajectories = synthetic_trajectories()
    rewards = np.array([t.reward for t in trajectories], dtype=np.float32)
    adv = advantages("grpo", rewards, [t.group_id for t in trajectories], True)
    return collate(trajectories, adv.numpy())


def learner_config(model_dir: str, zero_stage: int = 0, **kw) -> LearnerConfig:
    return LearnerConfig(model_path=model_dir, zero_stage=zero_stage, lr=1e-2, micro_batch_tokens=40, lora=LORA, **kw)


def peft_state(worker) -> dict[str, torch.Tensor]:
    """The wrapped model's own tensors (base and adapter, PEFT's names), gathered under ZeRO-3."""
    import deepspeed

    module = worker.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=worker.cfg.zero_stage == 3):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_parameters(worker) -> list[torch.nn.Parameter]:
    """The model parameters the optimizer steps (under ZeRO-3 it keeps them in its fp16_groups)."""
    groups = worker.optimizer.fp16_groups if worker.cfg.zero_stage == 3 else worker.optimizer.param_groups
    return [p for group in groups for p in (group if isinstance(group, list) else group["params"])]


def merged_by_peft(model_dir: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's own merge (merge_and_unload) of a model holding `state`."""
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LORA)
    model.load_state_dict(state)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_lora_step_trains_only_the_adapter_and_syncs_send_it_alone(model_dir, zero_stage):
    batch = make_batch()
    with in_process_rank(learner_config(model_dir, zero_stage)) as worker:
        adapter = {id(p) for n, p in worker.engine.module.named_parameters() if ".lora_" in n}
        assert {id(p) for p in optimizer_parameters(worker)} == adapter
        before = peft_state(worker)
        for _ in range(2):  # B starts at zero, so A has no gradient until B has moved
            metrics = worker.train_step(batch, batch_totals(batch)).metrics
        after = peft_state(worker)
        full = worker.full_state_dict()
        sent = {n: t.clone() for n, t in worker._gathered_parameters()}
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in lora.sync_weights(worker.engine.module)}
    assert np.isfinite(metrics["actor/loss"]) and metrics["actor/grad_norm"] > 0
    for name, value in before.items():
        if ".lora_" in name:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name  # bit-identical
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = merged_by_peft(model_dir, after)
    assert list(full) == list(plain.state_dict()) == list(expected)
    # a sync: every target's A and B by PEFT's saved names (what vLLM parses), B scaled by alpha / rank
    adapter_names = [n.replace(".default.", ".") for n in after if ".lora_" in n]
    assert list(sent) == adapter_names and shapes == {n: tuple(t.shape) for n, t in sent.items()}
    for name, value in sent.items():
        own = after[name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")]
        torch.testing.assert_close(value, own * (LORA.scale if ".lora_B." in name else 1.0), rtol=0, atol=0)
    weights = dict(plain.named_parameters())
    for name in [n for n in sent if ".lora_A." in n]:  # base + B A from what was sent is the merged weight
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = sent[name.replace(".lora_A.", ".lora_B.")]
        torch.testing.assert_close(weights[f"{module}.weight"] + b @ sent[name], expected[f"{module}.weight"],
                                   rtol=0, atol=1e-6)  # fmt: skip
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, rtol=0, atol=1e-6, msg=name)
    moved = [n for n, v in plain.state_dict().items() if not torch.equal(full[n], v)]
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in moved)


def test_the_weight_plan_is_the_adapters(model_dir):
    """Under ZeRO-3 too the plan names the adapter's tensors by their full (unpartitioned) shapes."""
    from types import SimpleNamespace

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wrapped = lora.wrap(plain, LORA)
    specs = [TensorSpec(n.replace(".default.", "."), "float32", tuple(p.shape))
             for n, p in wrapped.named_parameters() if ".lora_" in n]  # fmt: skip
    with in_process_rank(learner_config(model_dir, 3)) as worker:
        worker.broadcaster = SimpleNamespace(bucket_bytes=1 << 16)
        assert worker.weight_plan() == plan_to_wire(plan_buckets(specs, 1 << 16))


def test_the_export_is_the_merged_model(model_dir, tmp_path):
    batch = make_batch()
    with in_process_rank(learner_config(model_dir, 3)) as worker:
        worker.train_step(batch, batch_totals(batch))
        full = worker.full_state_dict()
        worker.export_model(str(tmp_path / "out"), 1 << 20)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert exported.keys() == full.keys()
    for name, value in full.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)


def test_each_objective_steps_and_packing_does_not_change_the_loss(model_dir):
    batch = make_batch()
    totals = batch_totals(batch)
    with in_process_rank(learner_config(model_dir)) as worker:
        for objective in OBJECTIVES:  # vespo and the baselines
            worker.rebuild(replace(worker.cfg, objective=objective))
            metrics = worker.train_step(batch, totals).metrics
            assert np.isfinite(metrics["actor/loss"]) and metrics["actor/grad_norm"] > 0, objective
        losses, logprobs = {}, {}
        for packed in (True, False):  # the adapter has moved: B is no longer zero
            worker.cfg = replace(worker.cfg, pack_sequences=packed)
            losses[packed] = worker.evaluate_loss(batch, totals).metrics["actor/loss"]
            logprobs[packed] = worker.compute_logprobs(batch)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-7)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[True][mask], logprobs[False][mask], rtol=0, atol=1e-5)


def test_a_lora_learner_takes_log_probs_in_vocabulary_slices(model_dir, monkeypatch):
    """PEFT's forward does not declare logits_to_keep; the learner still never builds the full logits."""
    import learner.logprobs as logprobs

    full_calls = []
    real = logprobs.full_logits_token_logprobs
    monkeypatch.setattr(logprobs, "full_logits_token_logprobs", lambda *a, **k: full_calls.append(1) or real(*a, **k))
    batch = make_batch()
    with in_process_rank(learner_config(model_dir)) as worker:
        sliced = worker.compute_logprobs(batch)
        assert not full_calls
        monkeypatch.setattr(logprobs, "_causal_lm", lambda m: m)  # the wrapper taken as it is
        full = worker.compute_logprobs(batch)
    assert full_calls  # ... falls back to the full logits
    mask = batch.response_mask.bool()
    torch.testing.assert_close(sliced[mask], full[mask], rtol=0, atol=1e-5)


def test_null_lora_trains_every_weight(model_dir):
    with in_process_rank(LearnerConfig(model_path=model_dir)) as worker:
        assert not lora.is_wrapped(worker.engine.module)
        params = list(worker.engine.module.parameters())
        assert {id(p) for p in optimizer_parameters(worker)} == {id(p) for p in params}


def test_bad_lora_settings_are_one_line_before_anything_starts():
    with pytest.raises(ConfigError, match=r"^learner.lora.rank must be >= 1, got 0$"):
        LearnerConfig(lora={"rank": 0})
    with pytest.raises(PreflightError) as err:
        check(run_config.load(None, ["learner.lora.target_modules=[q_proj, c_attn]"]))
    assert str(err.value).startswith("learner.lora.target_modules: model tiny has no module 'c_attn'; its linear")
    check(run_config.load(None, ["learner.lora.rank=4"]))  # the default targets are all in the tiny model
