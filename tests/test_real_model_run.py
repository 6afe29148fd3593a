"""A new user's first real run, as they would type it: `vespo train model=smollm2-135m` on the
math task from a veRL-schema Parquet file, then `vespo eval` on the checkpoint it wrote.

Real model, real data shape, real stack (vLLM engine actor, reward worker processes running
math-verify, DeepSpeed learner, weight broadcast, wandb offline): the path that failed while
every end-to-end test trained the toy.
"""

from __future__ import annotations

import json

import torch
from run_fixtures import EXPECTED_KEYS, vespo
from wandb_offline import read_run

from rollout.tasks.word_problems import write_parquet
from vespo.models import resolve_model

STEPS = 2  # two updates and two broadcasts: enough to show training moved the weights and served them


def test_smollm2_trains_on_verl_parquet_math_and_its_checkpoint_serves(tmp_path):
    data = write_parquet(tmp_path / "word_problems.parquet", 120, seed=7)
    task = ["model=smollm2-135m", "task.name=math", f"task.path={data}", "task.eval_fraction=0.1",
            "rollout.max_new_tokens=48", "rollout.max_model_len=384"]  # fmt: skip
    train = vespo(
        "train", *task, f"train.steps={STEPS}", "train.groups_per_step=4", "rollout.n=8",
        "train.max_inflight_groups=4", f"train.eval_every={STEPS}", "train.eval_prompts=8",
        "train.eval_log_samples=3", "learner.lr=1e-6", "buffer.max_staleness=1",
        "learner.num_cpus_per_worker=2",  # two torch threads (Ray sets them from the CPUs asked for)
        f"train.output_dir={tmp_path / 'run'}",
        f"wandb.dir={tmp_path / 'run'}",
    )  # fmt: skip
    out = train.stdout
    assert "checked: model" in out and "108 train / 12 held-out prompts" in out, out[-3000:]
    assert f"done: {STEPS} steps" in out, out[-3000:]
    assert f"sample at step {STEPS}: " in out and "####" in out  # a sampled response, with the prompt's end

    run_dir = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    history, _ = read_run(run_dir)
    keys = set().union(*history)
    assert EXPECTED_KEYS | {"reward/error_frac", "faults/reward_errors", "eval/accuracy"} <= keys, EXPECTED_KEYS - keys
    steps = [row for row in history if "reward/mean" in row]
    assert [row["_step"] for row in steps] == list(range(1, STEPS + 1))
    assert all(row["staleness/batch_max"] <= 1 for row in steps)  # buffer.max_staleness held in async mode
    assert all(row["faults/reward_errors"] == 0 and row["reward/error_frac"] == 0 for row in steps)
    # a real starting point: mostly wrong, but not always (RL has a signal)
    assert sum(row["reward/mean"] for row in steps) > 0, [row["reward/mean"] for row in steps]
    table = next(row["eval/samples/path"] for row in history if "eval/samples/path" in row)  # nested keys flattened
    logged = json.loads((run_dir / "files" / table).read_text())
    assert logged["columns"][:4] == ["step", "prompt", "response", "reward"] and len(logged["data"]) == 3
    assert all(row[0] == STEPS and "<|im_start|>user" in row[1] for row in logged["data"])

    # the exported model: a Hugging Face directory transformers loads, still tied, and trained
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["policy_version"] == STEPS  # a broadcast after every step
    assert (ckpt / "buffer" / "buffer.msgpack").exists() and (ckpt / "controller" / "state.json").exists()
    model_dir = ckpt / "model"
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    assert trained.config.tie_word_embeddings
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert moved, "training changed no weight"

    # ... and vLLM serves it: `vespo eval` on the checkpoint, with a few examples to read
    evaluated = vespo("eval", *task, "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--prompts", "6",
                      "--examples", "2", "--json", str(tmp_path / "eval.json"))  # fmt: skip
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["model"] == str(model_dir) and result["prompts"] == 6 and result["reward_errors"] == 0
    assert evaluated.stdout.count("  example: ") == 2 and len(result["examples"]) == 2
