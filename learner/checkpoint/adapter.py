"""A LoRA learner's checkpoint (learner.lora): the adapter and its optimizer state, not the base model.

The base weights are frozen and stay what cfg.model_path holds, so a checkpoint leaves them out:
    deepspeed/  DeepSpeed's state without the frozen parameters (exclude_frozen_parameters): the
                module part holds the adapter, the optimizer only ever had the adapter
    adapter/    the adapter in PEFT's own format, adapter_config.json + adapter_model.safetensors,
                which peft.PeftModel.from_pretrained(base, dir) loads; its base_model_name_or_path
                names the base model directory
Resume builds the base from cfg.model_path and loads the rest (load_options). `vespo eval
--checkpoint` on a checkpoint without model/ merges the adapter into the base (merge_into_base)
and scores the result like any Hugging Face model. Imports torch (and PEFT, DeepSpeed where
used): learner.checkpoint does not re-export it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from learner.checkpoint.reader import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CheckpointError
from learner.lora import ADAPTER, is_wrapped

# what must agree for a checkpoint's adapter to be this learner's: shapes and the merge's scale
_MATCHING = ("r", "lora_alpha", "target_modules")


def save_adapter(module: torch.nn.Module, out_dir: Path, base_model: str, write: bool) -> None:
    """Write the adapter of a PEFT-wrapped module to out_dir in PEFT's format (only where
    `write`: rank 0). Collective under ZeRO-3: every rank takes part in gathering the adapter
    (small: the base weights stay partitioned)."""
    import deepspeed
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    params = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        if not write:
            return
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER, save_embedding_layers=False)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(module.peft_config[ADAPTER])
    config.base_model_name_or_path = str(Path(base_model).resolve()) if Path(base_model).is_dir() else base_model
    config.inference_mode = True
    config.save_pretrained(str(out_dir))


@contextmanager
def adapter_only_state(engine) -> Iterator[dict]:
    """The keyword arguments of DeepSpeed's save_checkpoint that leave a LoRA model's frozen base
    out (none for a plain model: its state as DeepSpeed saves it), valid within the context.
    exclude_frozen_parameters drops each frozen parameter by its first name only: a tied weight's
    other name (lm_head.weight of a model with tied embeddings) would still carry the whole
    matrix, so within the context every name goes."""
    if not is_wrapped(engine.module):
        yield {}
        return
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = original(*args, **{**kwargs, "exclude_frozen_parameters": True})
        for name in _frozen_names(engine.module):
            state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
    try:
        yield {"exclude_frozen_parameters": True}
    finally:
        del engine.module_state_dict  # the class's method again


def load_options(checkpoint_dir: Path, module: torch.nn.Module) -> dict:
    """The keyword arguments of DeepSpeed's load_checkpoint for this checkpoint and learner:
    none for full fine-tuning; under LoRA a module load that takes the adapter and requires
    nothing but the frozen base to be missing. A checkpoint of the other kind, or of another
    adapter shape, is refused with CheckpointError."""
    config_file = checkpoint_dir / ADAPTER_DIR / ADAPTER_CONFIG
    if not is_wrapped(module):
        if config_file.exists():
            raise CheckpointError(
                f"{checkpoint_dir} is a LoRA checkpoint (the adapter, no base weights) and this learner has "
                "learner.lora null: resume with the learner.lora of the run that wrote it"
            )
        return {}
    if not config_file.is_file():
        raise CheckpointError(
            f"{checkpoint_dir} is a full fine-tuning checkpoint and this learner trains a LoRA adapter "
            "(learner.lora): resume it with learner.lora null"
        )
    saved = json.loads(config_file.read_text())
    ours = module.peft_config[ADAPTER].to_dict()
    for key in _MATCHING:
        theirs, mine = saved.get(key), ours.get(key)
        if key == "target_modules":
            theirs, mine = sorted(theirs or []), sorted(mine or [])
        if theirs != mine:
            raise CheckpointError(f"{checkpoint_dir}: its adapter has {key}={theirs}, this learner's has {mine}")
    return {"load_module_strict": False, "custom_load_fn": _load_adapter_state}


def _load_adapter_state(src: dict, dst: torch.nn.Module) -> None:
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - _frozen_names(dst))
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the checkpoint's adapter state does not fit this model: missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )


def _frozen_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def merge_into_base(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the base model with the adapter merged in (PEFT's merge_and_unload) to out_dir as a
    plain Hugging Face directory (the base's tokenizer and config files with it). The base is
    the one adapter_config.json names, or `base_model`. It loads the whole model on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learner.export import copy_model_files

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = base_model or json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"the base model of the adapter in {adapter_dir} ({base!r}) is not a local directory")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_model_files(base, out_dir)  # tokenizer and the rest; save_pretrained rewrites the config
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
