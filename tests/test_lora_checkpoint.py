"""LoRA checkpoints (learner.checkpoint.adapter): the adapter and its optimizer state, no base
weights; a run resumes from one bit-identically, and `vespo eval --checkpoint` merges the adapter
into the base model. (The Hugging Face export of a LoRA learner, a plain merged model, is
tests/test_lora_learner.py::test_the_export_is_the_merged_model.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_fixtures import in_process_rank, save_tiny_llama, synthetic_trajectories
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from learner import checkpoint
from learner.advantages import advantages
from learner.batching import TrainBatch, collate
from learner.checkpoint import CheckpointError, CheckpointMeta
from learner.checkpoint.deepspeed_state import WeightsOnlyCheckpointEngine
from learner.config import LearnerConfig, LoraConfig
from learner.sharding import batch_totals

TARGETS = ("q_proj", "v_proj", "down_proj")
# dropout draws from the RNG in every training forward: exact only if the RNG state comes back too
LORA = LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=list(TARGETS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def make_batch(seed: int) -> TrainBatch:
    trajectories = synthetic_trajectories(seed=seed, version=seed)
    rewards = np.array([t.reward for t in trajectories], dtype=np.float32)
    adv = advantages("grpo", rewards, [t.group_id for t in trajectories], True)
    return collate(trajectories, adv.numpy())


def learner_config(model_dir: str, zero_stage: int, lora: LoraConfig | None = LORA) -> LearnerConfig:
    return LearnerConfig(model_path=model_dir, zero_stage=zero_stage, lr=1e-2, warmup_steps=3, micro_batch_tokens=40,
                         lora=lora)  # fmt: skip


def train(worker, batch: TrainBatch) -> float:
    return worker.train_step(batch, batch_totals(batch)).metrics["actor/loss"]


def save(worker, root: Path, step: int) -> Path:
    """What learner.group.save_checkpoint does on one in-process rank, model export aside."""
    staged = checkpoint.prepare_staging(root, step)
    worker.save_checkpoint(str(staged))
    return checkpoint.finalize(root, CheckpointMeta(step, step, 1, worker.cfg.zero_stage))


def module_state(worker) -> dict[str, torch.Tensor]:
    """The wrapped model's tensors by PEFT's names, gathered under ZeRO-3."""
    import deepspeed

    module = worker.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=worker.cfg.zero_stage == 3):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def optimizer_tensors(worker) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (moments, fp32 master partitions under ZeRO-3) and its step counts."""
    out: list[torch.Tensor] = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value.detach().clone())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(torch.tensor(value))

    walk(worker.optimizer.state_dict())
    return out


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint's DeepSpeed files, by file and key path."""
    engine, found = WeightsOnlyCheckpointEngine(None), {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for file in sorted((path / "deepspeed").rglob("*.pt")):
        walk(file.name, engine.load(str(file), map_location="cpu"))
    return found


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_lora_run_resumes_from_its_adapter_checkpoint_bit_identically(model_dir, tmp_path, zero_stage):
    batches = [make_batch(seed) for seed in range(4)]
    with in_process_rank(learner_config(model_dir, zero_stage)) as worker:
        for batch in batches[:2]:
            train(worker, batch)
        path = save(worker, tmp_path, step=2)
        expected_losses = [train(worker, batch) for batch in batches[2:]]
        expected, expected_optimizer = module_state(worker), optimizer_tensors(worker)
        expected_rng = torch.get_rng_state()
    with in_process_rank(learner_config(model_dir, zero_stage)) as resumed:
        assert resumed.load_checkpoint(str(checkpoint.latest(tmp_path))) == 2
        losses = [train(resumed, batch) for batch in batches[2:]]
        got, got_optimizer = module_state(resumed), optimizer_tensors(resumed)
        assert resumed.step_count == 4
    assert losses == expected_losses  # bit-for-bit: adapter, moments, LR schedule and dropout's RNG came back
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert len(got_optimizer) == len(expected_optimizer) > 0
    assert all(torch.equal(a, b) for a, b in zip(got_optimizer, expected_optimizer, strict=True))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): v
              for n, v in got.items() if ".lora_" not in n}  # fmt: skip
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[n], base[n]) for n in base)  # the base weights are still the original ones

    # what the checkpoint holds: the adapter (PEFT's format) and its optimizer state, no base weight
    assert not (path / "model").exists()
    assert {f.name for f in (path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    adapter_numel = sum(v.numel() for n, v in got.items() if ".lora_" in n)
    tensors = saved_tensors(path)
    module_keys = [k.split("/", 2)[2] for k in tensors if k.split("/")[1] == "module"]
    assert module_keys and all(".lora_" in k for k in module_keys)
    # no base weight in it: the module's adapter, the optimizer's two moments (ZeRO-3: and its fp32 master copy)
    assert sum(t.numel() for t in tensors.values()) <= 4 * adapter_numel + 16


def test_eval_merges_a_lora_checkpoint_into_its_base_model(model_dir, tmp_path):
    """`vespo eval --checkpoint` on a LoRA checkpoint scores the base with the adapter merged in:
    base + (alpha / rank) B A, what the learner itself sends and exports."""
    from peft import PeftModel

    from vespo.commands.evaluate import checkpoint_model

    batch = make_batch(0)
    with in_process_rank(learner_config(model_dir, 3)) as worker:
        for _ in range(2):  # B starts at zero: after two steps both A and B have moved
            train(worker, batch)
        path = save(worker, tmp_path / "checkpoints", step=2)
        learner_merged = worker.full_state_dict()
    merged_dir = Path(checkpoint_model(tmp_path / "checkpoints"))
    assert not (merged_dir / "adapter_config.json").exists()  # a plain Hugging Face model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert merged.keys() == base.keys() == learner_merged.keys()
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module.endswith(TARGETS):
            a, b = (adapter[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
            expected = weight + (LORA.lora_alpha / LORA.rank) * (b @ a)
            assert not torch.equal(expected, weight), name
        else:
            expected = weight
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(learner_merged[name], merged[name], rtol=0, atol=1e-6, msg=name)
    # the adapter directory is PEFT's own: from_pretrained on the base it names gives the same model
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(path / "adapter"))
    ids = batch.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_a_checkpoint_of_the_other_kind_is_refused(model_dir, tmp_path):
    """Full fine-tuning checkpoints are as before (the base weights in DeepSpeed's state, no
    adapter/); neither kind loads into a learner of the other, nor an adapter of another shape."""
    batch = make_batch(0)
    with in_process_rank(learner_config(model_dir, 0, lora=None)) as worker:
        train(worker, batch)
        full = save(worker, tmp_path / "full", step=1)
    assert not (full / "adapter").exists()
    module = saved_tensors(full)
    assert "mp_rank_00_model_states.pt/module/model.embed_tokens.weight" in module
    with in_process_rank(learner_config(model_dir, 0)) as worker:
        with pytest.raises(CheckpointError, match="is a full fine-tuning checkpoint and this learner trains a LoRA"):
            worker.load_checkpoint(str(full))
        train(worker, batch)
        lora_checkpoint = save(worker, tmp_path / "lora", step=1)
        # a full one's DeepSpeed state alone (weights and both moments) is ten times larger, model/ not counted
        assert tree_bytes(lora_checkpoint) * 10 < tree_bytes(full)
        with pytest.raises(CheckpointError, match=r"its adapter has r=4, this learner's has 8"):
            worker.rebuild(learner_config(model_dir, 0, LoraConfig(rank=8, target_modules=list(TARGETS))))
            worker.load_checkpoint(str(lora_checkpoint))
        worker.rebuild(learner_config(model_dir, 0, lora=None))
        with pytest.raises(CheckpointError, match="is a LoRA checkpoint .* learner.lora null"):
            worker.load_checkpoint(str(lora_checkpoint))
    assert checkpoint.validate(lora_checkpoint) == lora_checkpoint
    staged = checkpoint.prepare_staging(tmp_path / "lora", step=2)  # sealed, but its adapter cut short
    shutil.copytree(lora_checkpoint, staged, dirs_exist_ok=True, ignore=shutil.ignore_patterns("meta.json"))
    (staged / "adapter" / "adapter_config.json").unlink()
    cut = checkpoint.finalize(tmp_path / "lora", CheckpointMeta(2, 2, 1, 0))
    with pytest.raises(CheckpointError, match="holds a LoRA adapter without adapter/adapter_config.json"):
        checkpoint.validate(cut)


def test_tied_embeddings_stay_out_of_a_lora_checkpoint(tmp_path):
    """DeepSpeed's exclude_frozen_parameters drops a frozen weight by its first name only: the
    tied lm_head.weight of a model like SmolLM2 or Qwen2.5 would carry the embedding matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    with in_process_rank(learner_config(str(tmp_path / "tied"), 0)) as worker:
        train(worker, make_batch(0))
        path = save(worker, tmp_path / "checkpoints", step=1)
        expected = module_state(worker)
        assert worker.load_checkpoint(str(path)) == 1  # the tied name is frozen base: not missing from the adapter
        assert all(torch.equal(v, expected[n]) for n, v in module_state(worker).items())
    module_keys = [k.split("/", 2)[2] for k in saved_tensors(path) if k.split("/")[1] == "module"]
    assert module_keys and all(".lora_" in k for k in module_keys)
