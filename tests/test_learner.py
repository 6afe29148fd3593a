"""The DeepSpeed learner on CPU with two Ray-actor ranks (gloo): real DeepSpeed, real Ray."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from learner_fixtures import save_tiny_llama, synthetic_trajectories
from transformers import AutoModelForCausalLM

from learner.checkpoint import CheckpointError, latest
from learner.config import LearnerConfig
from learner.group import LearnerGroup
from learner.logprobs import token_logprobs
from learner.objectives import compute_loss

LR = 1e-3
# Adam's first step moves a weight by lr * g / (|g| + eps). With the default eps 1e-8 a weight
# whose gradient is ~1e-8 moves by an amount that the summation order of its gradient (two
# ranks and micro-batches against one batch) decides; the comparison uses a larger eps, so
# every weight's step is a smooth function of its gradient.
ADAM_EPS = 1e-5


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_learner")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def make_group(model_dir, zero_stage=2, **kw) -> LearnerGroup:
    cfg = LearnerConfig(model_path=model_dir, world_size=2, zero_stage=zero_stage, lr=LR, micro_batch_tokens=40, **kw)
    return LearnerGroup(cfg)


def reference_step(model_dir, batch) -> dict[str, torch.Tensor]:
    """One plain-torch AdamW step on the whole batch at once: what DeepSpeed must reproduce."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, eps=ADAM_EPS)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    loss, _ = compute_loss("vespo", lp, batch.behavior_logprobs, batch.advantages, batch.response_mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_zero_stages_match_a_plain_torch_adamw_step(ray_cluster, model_dir, zero_stage):
    group = make_group(model_dir, zero_stage, eps=ADAM_EPS)
    try:
        batch = group.make_batch(synthetic_trajectories())
        before = group.evaluate_loss(batch).metrics["actor/loss"]
        metrics = group.train_step(batch).metrics
        after = group.evaluate_loss(batch).metrics["actor/loss"]
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    assert metrics["actor/loss"] == pytest.approx(before, rel=1e-5)
    assert after < before  # a step on the VESPO surrogate lowers it on the same batch
    expected = reference_step(model_dir, batch)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        # Adam's first step moves each weight by about lr; agreement well inside that
        torch.testing.assert_close(weights[name], value, rtol=0, atol=LR * 1e-2, msg=name)
    assert metrics["actor/grad_norm"] > 0 and metrics["perf/train_tokens_per_s"] > 0
    assert {"vespo/W_mean", "vespo/phi_mean", "staleness/oldest_version"} <= metrics.keys()


def test_resume_reproduces_the_next_steps_exactly(ray_cluster, model_dir, tmp_path):
    batches = [synthetic_trajectories(seed=s, version=s) for s in range(3)]
    group = make_group(model_dir, zero_stage=2, warmup_steps=2)
    try:
        tensors = [group.make_batch(b) for b in batches]
        corrected = group.with_old_logprobs(tensors[0])
        plain_loss = group.evaluate_loss(tensors[0]).metrics["actor/loss"]
        corrected_metrics = group.evaluate_loss(corrected).metrics
        group.train_step(tensors[0])
        buffer_state = {"trajectories": 7}
        path = group.save_checkpoint(
            tmp_path, step=1, policy_version=1, extra={"buffer": lambda d: _write_json(d, buffer_state)}
        )
        expected = [group.train_step(t).metrics["actor/loss"] for t in tensors[1:]]
    finally:
        group.shutdown()
    # pi_old is the learner's own policy: the decomposition pi/pi_old * pi_old/mu leaves W, and
    # so the loss, unchanged, while the mismatch term carries the engine's discrepancy
    assert corrected_metrics["actor/loss"] == pytest.approx(plain_loss, rel=1e-5)
    assert abs(corrected_metrics["vespo/mismatch_s_mean"]) > 0
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    expected_old = token_logprobs(reference, tensors[0].input_ids, tensors[0].attention_mask).detach()
    mask = tensors[0].response_mask > 0
    torch.testing.assert_close(corrected.old_logprobs[mask], expected_old[mask], rtol=1e-5, atol=1e-5)
    assert latest(tmp_path) == path
    assert json.loads((path / "buffer" / "state.json").read_text()) == buffer_state
    assert (path / "model" / "model.safetensors").exists() and (path / "model" / "config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(path / "model")  # a usable Hugging Face directory
    assert exported.config.vocab_size == 48

    resumed = make_group(model_dir, zero_stage=2, warmup_steps=2)
    try:
        meta = resumed.load_checkpoint(tmp_path)
        got = [resumed.train_step(t).metrics["actor/loss"] for t in tensors[1:]]
    finally:
        resumed.shutdown()
    assert (meta.step, meta.policy_version) == (1, 1)
    assert got == expected  # bit-for-bit: weights, Adam moments and the LR schedule came back


def test_rebuild_starts_over_from_the_model_with_the_new_objective(ray_cluster, model_dir):
    """What a sweep relies on: after rebuild the ranks hold the original weights, a fresh
    optimizer and the new objective, and a step reproduces a fresh group's step exactly."""
    from dataclasses import replace

    batch_trajs = synthetic_trajectories(seed=3)
    group = make_group(model_dir, zero_stage=2)
    try:
        batch = group.make_batch(batch_trajs)
        group.train_step(batch)
        group.train_step(batch)
        group.rebuild(replace(group.cfg, objective="grpo"))
        start = group.full_state_dict()
        rebuilt = group.train_step(batch).metrics
        with pytest.raises(ValueError, match="world_size and zero_stage must not change"):
            ray.get(group.workers[0].rebuild.remote(replace(group.cfg, zero_stage=3)))
    finally:
        group.shutdown()
    fresh = make_group(model_dir, zero_stage=2, objective="grpo")
    try:
        expected = fresh.train_step(fresh.make_batch(batch_trajs)).metrics
    finally:
        fresh.shutdown()
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, value in original.items():
        torch.testing.assert_close(start[name], value, rtol=0, atol=0, msg=name)
    assert "actor/pg_clipfrac" in rebuilt and not any(k.startswith("vespo/") for k in rebuilt)
    assert rebuilt["actor/loss"] == expected["actor/loss"]
    assert rebuilt["actor/grad_norm"] == pytest.approx(expected["actor/grad_norm"], rel=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nonfinite_gradient_skips_the_update_on_every_rank(ray_cluster, model_dir, zero_stage):
    """Never a silent NaN step: a batch whose loss is NaN leaves weights (and Adam state)
    untouched on both ranks and says so; the next good batch trains normally."""
    from dataclasses import replace

    group = make_group(model_dir, zero_stage)
    try:
        good = group.make_batch(synthetic_trajectories(seed=5))
        poisoned = good.advantages.clone()
        poisoned[0] = float("nan")  # one row of one rank's shard
        before = group.full_state_dict()
        bad = group.train_step(replace(good, advantages=poisoned)).metrics
        after_bad = group.full_state_dict()
        ok = group.train_step(good).metrics
        after_good = group.full_state_dict()
    finally:
        group.shutdown()
    assert bad["actor/step_skipped"] == 1.0 and ok["actor/step_skipped"] == 0.0
    for name, value in before.items():
        torch.testing.assert_close(after_bad[name], value, rtol=0, atol=0, msg=name)
        assert torch.isfinite(after_good[name]).all()
    assert any(not torch.equal(after_good[n], before[n]) for n in before)


def test_partial_and_corrupt_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        latest(tmp_path)
    (tmp_path / "step_00000003.tmp").mkdir()
    (tmp_path / "latest").write_text("step_00000003.tmp")
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        latest(tmp_path)
    broken = tmp_path / "step_00000004"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (tmp_path / "latest").write_text(broken.name)
    with pytest.raises(CheckpointError, match="no readable meta.json"):
        latest(tmp_path)


def test_config_errors_are_clear(model_dir):
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        LearnerConfig(model_path=model_dir, zero_stage=4)
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        LearnerConfig(model_path=model_dir, objective="ppo")
    with pytest.raises(ValueError, match=r"unknown vespo option\(s\) \['k'\]"):
        LearnerConfig(model_path=model_dir, objective_config={"k": 1.0})


def _write_json(directory, data):
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps(data))
