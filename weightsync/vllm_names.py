"""The learner's weight names as a vLLM model loads them, decided inside the vLLM worker.

The learner sends its transformers model's names and in-memory layout; vLLM's loaders read
checkpoints. For dense models the two are the same. For Mixture-of-Experts models transformers 5
fuses each layer's experts (weightsync.checkpoint_format), and vLLM 0.32's fused-MoE layer reads
such fused tensors whole when they carry the fused names it knows (`experts.gate_up_proj`,
`experts.down_proj`, at its own module path): Qwen3-MoE, Qwen2-MoE and OLMoE load as they are,
and GraniteMoE's experts. Others do not: Mixtral's vLLM model has `block_sparse_moe` where
transformers has `mlp` (experts and router), so its loader refuses the learner's names. Those
names (and only those: Mixtral's experts and routers, GraniteMoE's routers) are converted here
to the checkpoint's, with transformers' own table for the model's config, one tensor at a
time, so the wire format stays the learner's and the engines need no copy of the model.

A name passes as it is only when vLLM is known to read it whole in the same layout: a fused
expert tensor that transformers merely un-fuses on save, at the path of a vLLM fused-MoE layer
that lists that fused name and does not expect it transposed. Anything else that saving would
rename or convert gets the checkpoint's name: the one format every vLLM loader reads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from weightsync.checkpoint_format import CheckpointFormat

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"experts\.\d+\.")


class LearnerNames:
    """One vLLM model's view of the learner's names: which to convert, and the conversion."""

    def __init__(self, vllm_model: torch.nn.Module, hf_config: Any):
        self.model = vllm_model
        self.format = CheckpointFormat.for_config(hf_config)
        self.mapper = getattr(vllm_model, "hf_to_vllm_mapper", None)
        self._converted: dict[tuple[str, ...], frozenset[str]] = {}

    def converted(self, names: Sequence[str]) -> frozenset[str]:
        """The names vLLM would not load as they are (decided once per list of names: an
        update sends the same names every time)."""
        key = tuple(names)
        if key not in self._converted:
            fmt = self.format
            refused = [] if fmt is None else [n for n in names if fmt.changes(n) and not self.loads_as_is(n)]
            self._converted[key] = frozenset(fmt.group(names, refused)) if refused else frozenset()
            if refused:
                log.info("%d of %d weights go to vLLM in checkpoint names (e.g. %s)", len(refused), len(names),
                         refused[0])  # fmt: skip
        return self._converted[key]

    def to_vllm(
        self, named: Iterable[tuple[str, torch.Tensor]], names: Sequence[str]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The learner's tensors with the names vLLM's loader takes; `named` itself when all
        load as they are (dense models, Qwen3-MoE's fused experts)."""
        convert = self.converted(names)
        if not convert:
            return named
        return self.format.convert(named, names, only=convert)

    def loads_as_is(self, name: str) -> bool:
        """Whether vLLM's loader reads this in-memory tensor whole and right: a fused expert
        tensor at the path of a vLLM fused-MoE layer that lists that fused name."""
        if self.format is None or not self.format.only_splits(name):
            return False
        mapped = _map_name(self.mapper, name) if self.mapper is not None else name
        if mapped is None:
            return False
        parts = mapped.split(".")
        module: torch.nn.Module | None = self.model
        for i in range(len(parts)):
            experts = _routed_experts(module)
            if experts is not None:
                return _reads_fused(experts, ".".join(parts[i:]))
            module = module._modules.get(parts[i])
            if module is None:
                return False
        return False


def _map_name(mapper: Any, name: str) -> str | None:
    """The model's own checkpoint-to-vLLM renaming, applied by its loader before anything else."""
    map_name = getattr(mapper, "map_name", None) or mapper._map_name
    return map_name(name)


def _routed_experts(module: torch.nn.Module) -> Any | None:
    """The fused-MoE expert weights' loader of this module, if it is a fused-MoE layer (vLLM
    0.32: a MoERunner holding RoutedExperts)."""
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except ImportError:  # another vLLM's layout: convert whatever saving converts (always loadable)
        return None
    if isinstance(module, RoutedExperts):
        return module
    experts = getattr(module, "routed_experts", None)
    return experts if isinstance(experts, RoutedExperts) else None


def _reads_fused(experts: Any, rest: str) -> bool:
    """`rest` (the name below the layer) is one of the fused names this layer reads whole, in
    the in-memory (untransposed) layout."""
    if getattr(experts, "is_fused_checkpoint_transposed", False):
        return False
    qualified = f"{experts.layer_name}.{rest}"
    mapping = experts.get_expert_mapping(include_fused=True)
    return any(qualified.endswith(f".{w}") for _, w, _, _ in mapping if not _PER_EXPERT.search(w))
