"""LoRA adapter updates (learner.lora): what the engines receive instead of full weights.

A sync under LoRA carries every target's A (rank x in) and B (out x rank) by the names PEFT
saves them under (`base_model.model.<module>.lora_A.weight`), B already scaled by alpha / rank.
vLLM engines load them into their LoRA slot in memory (`load_into_vllm`, run in the worker);
the transformers engine merges them into its own weights (`AdapterMerger`). Both sides keep
the base weights they started from, so each update replaces the adapter, never adds to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

ADAPTER_ID = 1  # vLLM's id for the one adapter (ids start at 1)
ADAPTER_NAME = "vespo"
# vLLM requires a path on its LoRARequest; it is never read, since the adapter is loaded before
# any request names it and pinned so the worker never evicts (and reloads) it
ADAPTER_PATH = "/vespo/adapter-in-memory"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def is_adapter(names: Iterable[str]) -> bool:
    """Whether an update's tensor names are an adapter's (else: full weights by base names)."""
    names = list(names)
    return bool(names) and all(_NAME.match(n) for n in names)


def vllm_max_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    fits = [r for r in MAX_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"learner.lora.rank {rank} is above the largest rank vLLM serves ({MAX_LORA_RANKS[-1]})")
    return fits[0]


def pairs(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": tensor, "B": tensor}; refuses a module that lacks either half."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"not an adapter tensor name: {name}")
        out.setdefault(m["module"], {})[m["ab"]] = tensor
    broken = [k for k, v in out.items() if len(v) != 2]
    if broken:
        raise ValueError(f"adapter update lacks lora_A or lora_B of {broken[0]}")
    return out


def load_into_vllm(model_runner, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Replace the adapter in a vLLM worker's LoRA slot by these tensors, in memory (no file);
    returns its rank. Called with generation paused: the next step's requests see only the new one."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    worker = model_runner.lora_manager
    manager = worker._adapter_manager
    # clones: on the learner's node the tensors are views of its shared region, reused next update
    tensors = {n: t.detach().to("cpu", copy=True) for n, t in named}
    modules = pairs(tensors.items())
    rank = next(iter(modules.values()))["A"].shape[0]
    helper = PEFTHelper.from_dict({
        "r": rank, "lora_alpha": rank,  # scaling 1: B arrives scaled
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "vllm_max_position_embeddings": worker.max_position_embeddings,
    })  # fmt: skip
    helper.validate_legal(worker.lora_config)
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=ADAPTER_ID,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=worker.lora_config.lora_dtype,
        model_vocab_size=worker.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    if len(lora.loras) != len(modules):  # a target vLLM's model has no LoRA layer for
        taken = set(lora.loras)
        raise ValueError(f"vLLM's model took no adapter for {next(m for m in sorted(modules) if m not in taken)}")
    manager.remove_adapter(ADAPTER_ID)  # deactivates it: its slot is written afresh below
    manager.add_adapter(lora)
    manager.activate_adapter(ADAPTER_ID)
    manager.pin_adapter(ADAPTER_ID)
    return rank


class AdapterMerger:
    """The engine-side merge (transformers engine): W = W0 + B A for every target, from the
    base weights W0 kept at the first update, so a new adapter replaces the previous one."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}

    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        updates = pairs(named)
        unknown = [m for m in updates if f"{m}.weight" not in self.params]
        if unknown:
            raise ValueError(f"adapter update for {unknown[0]}, which this model lacks")
        with torch.no_grad():
            for module, ab in updates.items():
                name = f"{module}.weight"
                weight = self.params[name]
                base = self.base.setdefault(name, weight.detach().clone())
                delta = ab["B"].to(torch.float32) @ ab["A"].to(torch.float32)
                weight.copy_((base.to(torch.float32) + delta.to(base.device)).to(weight.dtype))
