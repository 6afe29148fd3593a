"""LoRA training (learner.lora): a PEFT adapter trains; the engines receive the adapter alone.

A weight sync sends only the adapter (sync_weights / sync_gathered): every target's A and B by
the names PEFT saves them under, which is what vLLM's LoRA loader parses, with the scale
alpha / rank folded into B so the engines need no config to apply it. Exports and `full_state_dict`
speak the base model's names and shapes: each LoRA target goes out merged, W + (alpha / rank) B A,
computed one parameter at a time (gathered under ZeRO-3) so no rank ever holds the model twice.

PEFT renames what it wraps: the model sits under `base_model.model.`, a target's own weight
becomes `<module>.base_layer.weight` and its adapter `<module>.lora_A.default.weight` and
`<module>.lora_B.default.weight`. The functions here undo that for a wrapped model and leave a
plain one (learner.lora null) exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from learner.config import LoraConfig

ADAPTER = "default"  # PEFT's name for the one adapter
_ADAPTER_TENSOR = re.compile(r"(^|\.)lora_\w+(\.|$)")  # lora_A, lora_B, lora_embedding_A, ...
Named = tuple[str, torch.Tensor]


def wrap(model: torch.nn.Module, cfg: LoraConfig | None) -> torch.nn.Module:
    """The model with a fresh adapter on cfg.target_modules and every base weight frozen, or
    the model unchanged when cfg is None (full fine-tuning)."""
    if cfg is None:
        return model
    import peft

    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules))  # fmt: skip
    return peft.get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer steps: the adapter under LoRA, every parameter otherwise (a frozen
    base weight given to AdamW would still cost its moments' memory)."""
    return [p for p in model.parameters() if p.requires_grad]


def is_wrapped(module: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The causal LM itself (its adapters injected): where its tied-weight keys and save rules live."""
    return module.base_model.model if is_wrapped(module) else module


def base_view(module: torch.nn.Module, entries: Iterable[Named]) -> list[Named]:
    """(name, tensor) of base_module(module) by the base model's own names, adapters dropped."""
    if not is_wrapped(module):
        return list(entries)
    return [(n.replace(".base_layer.", "."), t) for n, t in entries if not _ADAPTER_TENSOR.search(n)]


def named_weights(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the engines take, named and ordered as the plain model's named_parameters()
    (partitioned under ZeRO-3: their full shape is ds_shape)."""
    return base_view(module, base_module(module).named_parameters())


def gathered(module: torch.nn.Module, entries: Iterable[Named]) -> Iterator[Named]:
    """(name, full tensor) for each of `entries` (from base_view), a LoRA target merged with its
    adapter. Under ZeRO-3 each tensor (with its adapter) is gathered alone; a yielded tensor is
    valid until the next one is asked for."""
    import deepspeed

    targets = _targets(module)
    for name, tensor in entries:
        layer = targets.get(name)
        params = [tensor] if layer is None else [tensor, *_adapter_parameters(layer)]
        with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
            if layer is None:
                yield name, tensor.detach()
                continue
            with torch.no_grad():  # PEFT's own merge formula (its scaling, fan-in/fan-out layout)
                merged = tensor.detach() + layer.get_delta_weight(ADAPTER).to(tensor.dtype)
        yield name, merged  # a copy of its own: the gathered shards may go


def sync_weights(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """What one weight sync sends, in order: under LoRA the adapter's A and B of every target
    (PEFT's saved names: `base_model.model.<module>.lora_A.weight`), else named_weights."""
    if not is_wrapped(module):
        return named_weights(module)
    adapter = [(n, p) for n, p in module.named_parameters() if _ADAPTER_TENSOR.search(n)]
    other = sorted({n for n, _ in adapter if not re.search(r"\.lora_[AB]\.", n)})
    if other:  # embedding adapters, DoRA magnitudes: not what the engines' LoRA layers take
        raise ValueError(f"learner.lora: only linear layers' lora_A/lora_B can be sent to the engines, not {other[0]}")
    return [(n.replace(f".{ADAPTER}.", "."), p) for n, p in adapter]


def sync_gathered(module: torch.nn.Module, entries: Iterable[Named]) -> Iterator[Named]:
    """(name, full tensor) for each of `entries` (from sync_weights), gathered one at a time under
    ZeRO-3; an adapter's B comes out scaled by its layer's alpha / rank."""
    if not is_wrapped(module):
        yield from gathered(module, entries)
        return
    import deepspeed

    scales = {f"base_model.model.{weight.removesuffix('.weight')}.lora_B.weight": layer.scaling[ADAPTER]
              for weight, layer in _targets(module).items()}  # fmt: skip
    for name, tensor in entries:
        with deepspeed.zero.GatheredParameters([tensor], enabled=hasattr(tensor, "ds_id")):
            scale = scales.get(name)
            yield name, tensor.detach() if scale is None else tensor.detach() * scale


def _targets(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The base weight name of every LoRA-wrapped module -> that module."""
    if not is_wrapped(module):
        return {}
    from peft.tuners.lora import LoraLayer

    return {f"{name}.weight": sub for name, sub in base_module(module).named_modules()
            if isinstance(sub, LoraLayer) and ADAPTER in sub.scaling}  # fmt: skip


def _adapter_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in layer.named_parameters() if _ADAPTER_TENSOR.search(n)]
