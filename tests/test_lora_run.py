"""LoRA as a user types it: `vespo train model=smollm2-135m learner.lora.rank=16` on veRL-schema
word problems, fully async (`-m slow`; `bench.lora` runs it too), and the tiny model in CI.

Every sync carries the adapter alone (the wandb `sync/bytes` is the adapter's size, not the
model's), the vLLM engine serves it from its LoRA slot, and the checkpoint holds the adapter in
PEFT's format. `vespo eval --checkpoint` merges such an adapter into its base model
(`tests/test_lora_checkpoint.py`) and then scores it as any model (`tests/test_real_model_run.py`).
"""

from __future__ import annotations

import json

import pytest
import torch
from run_fixtures import vespo
from safetensors.torch import load_file
from wandb_offline import read_run

from rollout.tasks.word_problems import write_parquet
from vespo.models import resolve_model

STEPS = 2
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # learner.lora's default


def adapter_and_model_bytes(path: str) -> tuple[int, int]:
    """fp32 bytes of a rank-16 adapter on every default target, and of the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    adapter = sum(RANK * (m.in_features + m.out_features) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)  # fmt: skip
    return 4 * adapter, 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)])  # slow: CI time
def test_a_lora_run_syncs_only_its_adapter(tmp_path, model):
    if model == "tiny":  # its embedded task: one-digit sums
        task = [f"model={model}", f"learner.lora.rank={RANK}", "learner.lr=1e-3"]
    else:
        data = write_parquet(tmp_path / "word_problems.parquet", 60, seed=3)
        task = [f"model={model}", "task.name=math", f"task.path={data}", "task.eval_fraction=0.1",
                "rollout.max_new_tokens=32", "rollout.max_model_len=320", f"learner.lora.rank={RANK}",
                "learner.lr=1e-4"]  # fmt: skip
    train = vespo(
        "train", *task, f"train.steps={STEPS}", "train.groups_per_step=2", "rollout.n=8",
        "train.max_inflight_groups=2", "train.eval_every=0", "buffer.max_staleness=1",
        "learner.num_cpus_per_worker=2", f"train.output_dir={tmp_path / 'run'}", f"wandb.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert f"done: {STEPS} steps" in train.stdout, train.stdout[-3000:]

    history, _ = read_run(next((tmp_path / "run" / "wandb").glob("offline-run-*")))
    steps = [row for row in history if "reward/mean" in row]
    adapter_bytes, model_bytes = adapter_and_model_bytes(resolve_model(model))
    assert [row["sync/bytes"] for row in steps] == [adapter_bytes] * STEPS  # the adapter, every sync
    assert adapter_bytes < model_bytes
    assert all(row["staleness/batch_max"] <= 1 for row in steps)
    # a step whose groups all scored alike has no gradient (easy to draw at a ~9% base rate)
    learned = any(row["actor/grad_norm"] > 0 for row in steps)

    ckpt = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    assert not (ckpt / "model").exists()  # no copy of the base model
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and set(config["target_modules"]) == set(TARGETS)
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in n and t.abs().max() > 0 for n, t in adapter.items()) == learned  # B starts at zero
