"""Sequence packing: several sequences share one row, so the model computes on real tokens.

Padded micro-batches cost rows x longest row however short the other rows are. Packed, the
sequences of a micro-batch are laid end to end in rows of a fixed width, each with its own
position_ids (restarting at 0). transformers reads positions that restart inside a row as
packed sequences when no 2D attention mask is given (masking_utils.find_packed_sequence_indices)
and builds a block-diagonal causal mask, so no token attends across sequences and every
sequence sees exactly the positions and context it has unpacked.

The row width is the longest sequence of the batch, widened to divide the token budget:
attention over a row is dense (sdpa with a mask), so rows no wider than needed keep its cost
near the padded path's, while the linear layers and the vocabulary projection, which dominate,
only see real tokens and short row tails. Log-probs are unpacked to the padded (rows, L-1)
layout at once, so the objectives, loss shares and metrics are computed as without packing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from learner.batching import TrainBatch, micro_batches, trim
from learner.logprobs import token_logprobs


@dataclass
class PackedRows:
    """Sequences laid end to end; `source` maps each column of the padded (n, L-1) log-prob
    layout to its flat position in the packed (R, W-1) log-probs, or to R*(W-1) (a zero)
    where the padded layout holds no real prediction."""

    input_ids: torch.Tensor  # (R, W) int64, padded rows' tokens back to back
    position_ids: torch.Tensor  # (R, W) int64, 0.. per sequence; each row tail is one more run from 0
    source: torch.Tensor  # (n, L-1) int64
    routed_experts: torch.Tensor | None = None  # (R, W, layers, top_k) int16, -1 where none (MoE)

    def to(self, device: torch.device | str) -> PackedRows:
        routed = None if self.routed_experts is None else self.routed_experts.to(device)
        return PackedRows(*(t.to(device) for t in (self.input_ids, self.position_ids, self.source)), routed)

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


def plan(lengths: list[int] | np.ndarray, token_budget: int) -> list[list[list[int]]]:
    """Micro-batches of packed rows of sequence indices: every sequence once, each micro-batch
    at most `token_budget` positions (rows x width), except that a sequence longer than the
    budget gets a micro-batch of its own. Rows are filled first-fit in decreasing length order,
    which for lengths well under the row width leaves rows nearly full."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable").tolist()
    alone = [[[i]] for i in order if lengths[i] > token_budget]
    rest = [i for i in order if lengths[i] <= token_budget]
    if not rest:
        return alone
    rows_per_micro = max(1, token_budget // max(int(lengths[rest[0]]), 1))
    width = token_budget // rows_per_micro
    rows: list[list[int]] = []
    free: list[int] = []
    for i in rest:
        need = int(lengths[i])
        fits = next((r for r, room in enumerate(free) if room >= need), None)
        if fits is None:
            rows.append([i])
            free.append(width - need)
        else:
            rows[fits].append(i)
            free[fits] -= need
    # rows opened earlier hold the longer sequences and are the fuller: keep them together
    micro = [rows[k : k + rows_per_micro] for k in range(0, len(rows), rows_per_micro)]
    return alone + micro


def pack(
    input_ids: torch.Tensor, lengths: list[int], rows: list[list[int]], pad_id: int = 0,
    routed: torch.Tensor | None = None,
) -> PackedRows:  # fmt: skip
    """Lay the sequences of padded `input_ids` (n, L) out in `rows` (indices into it, as `plan`
    makes them for one micro-batch): the packed width is the fullest row's token count. `routed`
    (n, L, layers, top_k), the engine's experts per token, is laid out the same way."""
    n, width_in = input_ids.shape
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    out_cols = max(width_in - 1, 1)
    missing = len(rows) * (width - 1)  # the zero appended after the flat packed log-probs
    source = torch.full((n, out_cols), missing, dtype=torch.long)
    experts = None if routed is None else routed.new_full((len(rows), width, *routed.shape[2:]), -1)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            length = lengths[i]
            ids[r, start : start + length] = input_ids[i, :length]
            if experts is not None:
                experts[r, start : start + length] = routed[i, :length]
            pos[r, start : start + length] = torch.arange(length)
            # column j predicts token j + 1: within a sequence, packed column start + j
            source[i, : length - 1] = r * (width - 1) + start + torch.arange(length - 1)
            start += length
        pos[r, start:] = torch.arange(width - start)
    return PackedRows(ids, pos, source, experts)


def packed_token_logprobs(
    model: torch.nn.Module, packed: PackedRows, temperature: float = 1.0, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of the packed sequences (and their entropies), in the padded (n, L-1) layout
    (0 off the sequences). No attention mask is passed on purpose: the model then derives the
    block-diagonal causal mask from the restarting position_ids."""
    out = token_logprobs(model, packed.input_ids, None, temperature, packed.position_ids, with_entropy=with_entropy)

    def unpacked(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.reshape(-1), values.new_zeros(1)])[packed.source]

    return tuple(unpacked(t) for t in out) if with_entropy else unpacked(out)


def padded_cost(lengths: list[int] | np.ndarray, micro: list[list[int]]) -> int:
    """Positions the padded path computes for these micro-batches (rows x longest row)."""
    return sum(len(rows) * max(int(lengths[i]) for i in rows) for rows in micro)


def packed_cost(lengths: list[int] | np.ndarray, micro: list[list[list[int]]]) -> int:
    """Positions the packed path computes for these micro-batches (rows x fullest row)."""
    return sum(len(rows) * max(sum(int(lengths[i]) for i in row) for row in rows) for rows in micro)


def micro_batches_of(
    batch: TrainBatch, token_budget: int, packed: bool
) -> Iterator[tuple[list[int], TrainBatch, PackedRows | None]]:
    """(batch rows, those rows trimmed in the padded layout, their packed rows or None when
    not packing) per micro-batch: the padded layout is what the objectives consume."""
    lengths = batch.attention_mask.sum(-1).tolist()
    if not packed:
        for rows in micro_batches(lengths, token_budget):
            yield rows, trim(batch.rows(rows)), None
        return
    for packed_rows in plan(lengths, token_budget):
        rows = [i for row in packed_rows for i in row]
        local, k = [], 0
        for row in packed_rows:
            local.append(list(range(k, k + len(row))))
            k += len(row)
        micro = trim(batch.rows(rows))
        yield rows, micro, pack(micro.input_ids, [lengths[i] for i in rows], local, routed=micro.routed_experts)
