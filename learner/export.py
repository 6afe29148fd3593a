"""Full weights out as a Hugging Face model directory, streamed shard by shard.

The weights arrive as an iterator of (name, tensor), in the order of a list of TensorSpecs
known up front (names, dtypes, full shapes). Under ZeRO-3 each tensor is gathered just before
it is yielded and released after, so the writer is the only place that holds weights: at most
one shard's worth (cloned to CPU) at a time, plus the one tensor being handed over (and, for a
fused expert tensor split into gate and up, one copy of it while its pieces are written). The
driver never sees a tensor; rank 0 writes.

Layout, the one `save_pretrained` writes and transformers and vLLM load: the source model's
non-weight files (config, tokenizer, generation config), then one `model.safetensors`, or
`model-00001-of-0000N.safetensors` ... with `model.safetensors.index.json` when the weights
take several shards. Weights are in the checkpoint format: where transformers 5 holds them in
another layout than its checkpoints (Mixture-of-Experts families fuse each layer's experts;
Mixtral also renames `block_sparse_moe` to `mlp`), they are converted back with transformers'
own save-time conversion (weightsync.checkpoint_format), as `save_pretrained` does, so readers
that predate the fused layout (transformers 4, vLLM loaders that want per-expert names) read
them too. The shards are laid out from the converted specs before anything is written
(`plan_buckets`, a tensor larger than a shard goes alone), so every file name is known in
advance.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from weightsync.checkpoint_format import CheckpointFormat
from weightsync.transport import TensorSpec, plan_buckets, spec_of

DEFAULT_SHARD_BYTES = 2 << 30
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
_METADATA = {"format": "pt"}


def shard_names(count: int) -> list[str]:
    if count <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def copy_model_files(source_model_dir: str | Path, out_dir: Path) -> None:
    """The source's config, tokenizer and generation config: every file but its weights, so
    the export loads with from_pretrained and tokenizes as the source did."""
    for item in Path(source_model_dir).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(item, out_dir / item.name)


def write_hf_streaming(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    specs: list[TensorSpec],
    source_model_dir: str | Path,
    out_dir: str | Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write the tensors (exactly those `specs` names, in that order: the model's in-memory
    names) as a Hugging Face model directory in checkpoint names, with shards of at most
    shard_bytes; returns the weight files written (shards, then the index if any). Each tensor
    is copied to CPU as it arrives, so the iterator may free it as soon as it is asked for the
    next one."""
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("export specs name a tensor more than once (tied weights must be deduplicated first)")
    checkpoint = CheckpointFormat.for_model_dir(source_model_dir)
    if checkpoint is not None:
        specs = checkpoint.specs(specs)
        named_tensors = checkpoint.convert(_checked(named_tensors, names), names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy_model_files(source_model_dir, out)
    plan = plan_buckets(specs, shard_bytes) if specs else []
    files = shard_names(len(plan)) if plan else []
    _remove_stale_weights(out, keep=set(files) | ({INDEX_FILE} if len(plan) > 1 else set()))

    from safetensors.torch import save_file

    tensors = iter(named_tensors)
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    for bucket, file in zip(plan, files, strict=True):
        shard: dict[str, torch.Tensor] = {}
        for spec in bucket:
            item = next(tensors, None)
            if item is None:
                raise ValueError(f"export ran out of tensors at {spec.name} (the specs name more)")
            name, tensor = item
            if spec_of(name, tensor) != spec:
                raise ValueError(f"export got {spec_of(name, tensor)} where the specs have {spec}")
            # a copy of its own: no storage shared with the model (safetensors refuses aliases)
            # and nothing left pointing at a gathered ZeRO-3 parameter once it is released
            shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
            weight_map[name] = file
            del item, tensor
        save_file(shard, str(out / file), metadata=_METADATA)
        written.append(out / file)
        del shard
    if next(tensors, None) is not None:
        raise ValueError("export got more tensors than the specs name")
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_FILE)
    return written


def _checked(named: Iterable[tuple[str, torch.Tensor]], names: list[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors, refused where they leave the specs' names (checked before conversion
    renames them; shapes and dtypes are checked after, against the converted specs)."""
    tensors = iter(named)
    for expected in names:
        item = next(tensors, None)
        if item is None:
            return  # the writer names what it ran out at
        if item[0] != expected:
            raise ValueError(f"export got {item[0]} where the specs have {expected}")
        yield item
        del item
    if next(tensors, None) is not None:
        raise ValueError("export got more tensors than the specs name")


def _remove_stale_weights(out: Path, keep: set[str]) -> None:
    """Weight files of an earlier export into the same directory that this one does not
    overwrite: left behind, a loader that globs *.safetensors would read them too."""
    for item in out.iterdir():
        if item.is_file() and _WEIGHT_FILE.fullmatch(item.name) and item.name not in keep:
            item.unlink()
