"""Bad models and data are refused before anything starts: one line on stderr, exit status 2, seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vespo.config import run_config
from vespo.config.preflight import PreflightError, check, vllm_lora_support
from vespo.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def verl_parquet(path: Path, count: int = 20, question: str = "What is {i} plus {i}?") -> Path:
    rows = [
        {
            "data_source": "test/doubling",
            "prompt": [{"role": "system", "content": "Answer briefly."},
                       {"role": "user", "content": question.format(i=i)}],
            "ability": "math",
            "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
            "extra_info": {"index": i, "split": "train"},
        }
        for i in range(count)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def config(*overrides: str) -> run_config.RunConfig:
    return run_config.load(None, list(overrides))


def test_a_good_run_is_summarised(tmp_path):
    data = verl_parquet(tmp_path / "train.parquet")
    checked = check(config("task.name=math", f"task.path={data}", "task.eval_fraction=0.25"))
    assert (checked.train_prompts, checked.eval_prompts, checked.too_long) == (15, 5, 0)
    # the tiny model's template renders the sample's own system turn
    assert checked.first_prompt.startswith("<|system|>Answer briefly.<|user|>What is")
    assert "15 train / 5 held-out prompts" in checked.summary()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=/no/such/dir"], "model: model '/no/such/dir' is neither a local directory nor one of: smollm2-135m"),
        (["task.name=math", "task.path=/no/such/file.parquet"], "task: math task file /no/such/file.parquet"),
        (["task.reward_fn=no_such_module:f"], "task.reward_fn: cannot load reward_fn 'no_such_module:f'"),
        (["rollout.max_model_len=10", "rollout.max_new_tokens=8"], "every prompt measured is longer than 2 tokens"),
        (["task.eval_fraction=0", "task.name=math", "task.path={data}"], "task: no held-out prompts"),
        (["rollout.temperature=0"], "rollout.temperature is 0 (greedy decoding): training needs sampled responses"),
        (["learner.routing_replay=rollout"], "routing_replay rollout needs a Mixture-of-Experts model; tiny has"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, overrides, message):
    data = verl_parquet(tmp_path / "train.parquet")
    with pytest.raises(PreflightError, match=None) as err:
        check(config(*(o.format(data=data) for o in overrides)))
    assert message in str(err.value)


def broken_copy(tmp_path: Path, name: str) -> Path:
    model = tmp_path / name
    shutil.copytree(resolve_model("tiny"), model)
    return model


def test_model_directories_that_cannot_serve_are_refused(tmp_path):
    data = verl_parquet(tmp_path / "train.parquet")
    no_template = broken_copy(tmp_path, "no-template")
    settings = json.loads((no_template / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(settings))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PreflightError, match="the data holds chat messages .* but the tokenizer has no chat template"):
        check(config(f"model={no_template}", "task.name=math", f"task.path={data}"))
    check(config(f"model={no_template}"))  # plain-text arithmetic prompts need no template

    no_tokenizer = broken_copy(tmp_path, "no-tokenizer")
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(PreflightError, match="cannot load its tokenizer"):
        check(config(f"model={no_tokenizer}"))

    bad_config = broken_copy(tmp_path, "bad-config")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(PreflightError, match="config.json is not readable JSON"):
        check(config(f"model={bad_config}"))


def test_the_cli_refuses_in_seconds_with_one_line_on_stderr(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        # an output_dir of its own: the default one may hold the user's `make train` run, refused first
        [sys.executable, "-m", "vespo", "train", "task.name=math", f"task.path={tmp_path / 'missing.parquet'}",
         f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.parquet" in lines[0] and "does not exist" in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert elapsed < 30, f"refusing took {elapsed:.0f}s"  # nothing was started: no Ray, no engine


def tiny_stablelm(tmp_path: Path) -> Path:
    """A random 2-layer StableLM with the tiny model's tokenizer: an architecture vLLM serves with
    a model class of its own that takes no LoRA, whose projections are named as Llama's."""
    import torch
    from transformers import StableLmConfig, StableLmForCausalLM

    model = tmp_path / "tiny-stablelm"
    torch.manual_seed(0)
    StableLmForCausalLM(StableLmConfig(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                       eos_token_id=1, pad_token_id=0)).save_pretrained(model)  # fmt: skip
    for f in Path(resolve_model("tiny")).iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, model / f.name)
    return model


def test_lora_on_a_model_vllm_cannot_serve_with_lora_is_refused(tmp_path):
    """learner.lora with vLLM engines: the model's vLLM class must take LoRA (asked in a process
    of its own: the driver never imports vLLM), the rank must be one vLLM serves, and each target
    a linear layer; the transformers backend merges the adapter itself and is not asked."""
    vllm_before = "vllm" in sys.modules
    stablelm = tiny_stablelm(tmp_path)
    # both architectures asked in one process: vLLM's import, the slow part, once
    support = vllm_lora_support("StableLmForCausalLM", "LlamaForCausalLM")
    assert not support["StableLmForCausalLM"]["lora"] and support["LlamaForCausalLM"]["lora"]
    with pytest.raises(PreflightError) as err:
        check(config(f"model={stablelm}", "learner.lora.rank=8"))
    assert str(err.value) == (
        f"learner.lora: vLLM cannot serve model {stablelm} with a LoRA adapter (its StablelmForCausalLM for "
        "StableLmForCausalLM does not support LoRA); set learner.lora: null (full fine-tuning) or rollout.backend "
        "transformers"
    )
    check(config(f"model={stablelm}"))  # full fine-tuning: vLLM serves it
    check(config(f"model={stablelm}", "learner.lora.rank=8", "rollout.backend=transformers"))

    check(config("learner.lora.rank=16"))  # the tiny Llama: vLLM's LlamaForCausalLM takes LoRA
    with pytest.raises(PreflightError, match=r"^learner.lora.rank 1024 is over the largest LoRA rank vLLM serves"):
        check(config("learner.lora.rank=1024"))
    with pytest.raises(PreflightError) as err:
        check(config("learner.lora.target_modules=[q_proj, input_layernorm]"))
    assert str(err.value).startswith("learner.lora.target_modules: 'input_layernorm' of model tiny is a LlamaRMSNorm, "
                                      "not a linear layer: vLLM's LoRA takes linear layers here")  # fmt: skip
    assert vllm_before or "vllm" not in sys.modules
