"""transformers' save-time weight conversion, applied one tensor at a time.

transformers 5 keeps some weights in memory in another layout than its checkpoints: most
Mixture-of-Experts families hold each layer's experts fused (`mlp.experts.gate_up_proj`
(experts, 2 x intermediate, hidden), `mlp.experts.down_proj`) where the checkpoint has one
tensor per expert and projection, and some rename modules on top (Mixtral's
`block_sparse_moe` is `mlp` in memory). It converts on load and reverts on save
(`revert_weight_conversion`, called by `save_pretrained`), from a table of transforms per
model family (`transformers.conversion_mapping`).

The learner trains and broadcasts the in-memory names. Whatever must read the checkpoint
format (a vLLM loader that does not know the fused names, an export that older tools read)
converts here with transformers' own table, so every family it knows is covered. Unlike
`revert_weight_conversion`, which takes the whole state dict, this streams: a tensor is
converted as soon as the tensors it is converted with have arrived (for the MoE families,
each fused tensor alone), so nothing holds more than one group of tensors at a time.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from weightsync.transport import TensorSpec, spec_of

log = logging.getLogger(__name__)


class CheckpointFormat:
    """The reverse of transformers' load-time conversion for one model: which names change
    on save, and the conversion itself, streamed."""

    def __init__(self, model: Any, conversions: list | None = None):
        """`model`: a transformers model of the family (a meta-device one will do: only its
        module tree and config are read); `conversions`: its load-time transforms, if known."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        conversions = _conversions(model) if conversions is None else conversions
        reverse = [t.reverse_transform() for t in conversions[::-1]]
        self._renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
        self._converters = [t for t in reverse if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._routes: dict[str, tuple[str, str | None]] = {}

    @classmethod
    def for_config(cls, config: Any) -> CheckpointFormat | None:
        """The format for a model of this config, or None when its checkpoints hold exactly what
        the model holds (dense models) or transformers cannot build it (then there is nothing
        of transformers' to revert either)."""
        model = _meta_model(config)
        conversions = _conversions(model) if model is not None else []
        return cls(model, conversions) if conversions else None

    @classmethod
    def for_model_dir(cls, path: str | Path) -> CheckpointFormat | None:
        from transformers import AutoConfig

        return cls.for_config(AutoConfig.from_pretrained(str(path)))

    def route(self, name: str) -> tuple[str, str | None]:
        """(the checkpoint name, or the first of a group's names; the converter pattern that
        matched, None for a plain rename or no change)."""
        if name not in self._routes:
            from transformers.core_model_loading import rename_source_key

            self._routes[name] = rename_source_key(name, self._renamings, self._converters, reverse=True)
        return self._routes[name]

    def changes(self, name: str) -> bool:
        """Whether saving renames or converts this tensor."""
        return self.route(name) != (name, None)

    def only_splits(self, name: str) -> bool:
        """Whether the checkpoint's tensors for this name are plain slices of it: a rename, or
        un-fusing (along the experts, gate from up) without any change of layout (transposes,
        permutations), so a loader that reads the fused tensor whole reads the same numbers."""
        from transformers.core_model_loading import Chunk, SplitModulelist

        _, pattern = self.route(name)
        if pattern is None:
            return True
        return all(isinstance(op, Chunk | SplitModulelist) for op in self._by_pattern[pattern].operations)

    def group(self, names: Iterable[str], members: Collection[str]) -> set[str]:
        """`members` and every name converted together with one of them (a converter may read
        several tensors at once; none of the MoE families' do)."""
        targets = {self.route(n)[0] for n in members if self.route(n)[1] is not None}
        return set(members) | {n for n in names if self.route(n)[1] is not None and self.route(n)[0] in targets}

    def convert(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        names: Collection[str],
        only: Collection[str] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors in checkpoint names and layout, in the order they come (a group's output
        comes when its last input does). `names`: every name `named` will yield, known up front
        so a group is converted as soon as it is complete. `only`: convert these names (a
        closed set: see `group`) and pass the rest as they are. Outputs may be views of the
        inputs (un-fusing splits without copying; a gate/up split copies once): use each one
        before asking for the next."""
        convert = set(names) if only is None else set(only)
        sizes = Counter(self.route(n)[0] for n in convert if self.route(n)[1] is not None)
        pending: dict[str, tuple[Any, int]] = {}
        for name, tensor in named:
            if name not in convert:
                yield name, tensor
                continue
            target, pattern = self.route(name)
            if pattern is None:
                yield target, tensor
                continue
            converter, seen = pending.pop(target, None) or (copy.deepcopy(self._by_pattern[pattern]), 0)
            converter.add_tensor(target, name, pattern, tensor)
            del tensor
            if seen + 1 < sizes[target]:
                pending[target] = (converter, seen + 1)
                continue
            out = converter.convert(target, model=self.model, config=self.model.config)
            del converter
            while out:
                key = next(iter(out))
                value = out.pop(key)
                yield key, value[0] if isinstance(value, list) else value
        if pending:
            raise ValueError(f"checkpoint conversion is missing tensors for {sorted(pending)}")

    def specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The checkpoint's tensor specs for these (in-memory) ones, worked out on meta tensors."""
        names = [s.name for s in specs]
        metas = ((s.name, torch.empty(s.shape, dtype=s.torch_dtype, device="meta")) for s in specs)
        return [spec_of(n, t) for n, t in self.convert(metas, names)]


def _conversions(model: Any) -> list:
    """The transforms `save_pretrained` reverts for a model built from its config (as
    `revert_weight_conversion` picks them: no legacy renames, no prefix changes)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    transforms = get_model_conversion_mapping(model, add_legacy=False)
    return [t for t in transforms if not isinstance(t, PrefixChange)]


def _meta_model(config: Any) -> Any | None:
    """The causal LM the learner builds for this config (AutoModelForCausalLM), on the meta
    device: its module tree, no memory. None when transformers has no such model."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        log.warning("no transformers model for %s (%s): weights keep their names", type(config).__name__, exc)
        return None
