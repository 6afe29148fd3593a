"""From trajectories to padded tensors, and from a batch to micro-batches under a token budget.

Micro-batches are cut from rows sorted by length, so each one pads only to the longest of
similar-length rows. This is the padded path (`learner.pack_sequences: false`); by default
learner.packing lays several sequences into each row instead, and these padded tensors remain
the layout the objectives consume. Pure functions, tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from buffer.trajectory import Trajectory


@dataclass
class TrainBatch:
    """Right-padded rows of prompt + response. Per-token fields are aligned to the *predicted*
    token: column j describes token j + 1 of input_ids (what logits[:, j] predict)."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    response_mask: torch.Tensor  # (B, L-1) float32: 1 where the predicted token is one the model sampled
    behavior_logprobs: torch.Tensor  # (B, L-1) float32
    advantages: torch.Tensor  # (B, L-1) float32, the sequence advantage on its response tokens
    token_versions: torch.Tensor  # (B, L-1) int64, -1 off the response
    # (B, L-1) pi_old recomputed by the learner, for the train/inference mismatch correction
    old_logprobs: torch.Tensor | None = None
    # (B, L, layers, top_k) int16, aligned with input_ids: the experts the engine routed each
    # token to (MoE), -1 where it recorded none (padding, the last token, episodes); None if dense
    routed_experts: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor | list[int]) -> TrainBatch:
        return self.map(lambda t: t[index])

    def map(self, fn) -> TrainBatch:
        """Apply fn to every tensor field (old_logprobs too, when present)."""
        return TrainBatch(**{f: None if (v := getattr(self, f)) is None else fn(v) for f in self.__dataclass_fields__})


def collate(trajectories: list[Trajectory], advantages: np.ndarray | torch.Tensor, pad_id: int = 0) -> TrainBatch:
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    width = max((t.num_tokens for t in trajectories), default=1)
    b = len(trajectories)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width - 1))
    blp = torch.zeros((b, width - 1))
    adv = torch.zeros((b, width - 1))
    versions = torch.full((b, width - 1), -1, dtype=torch.long)
    for i, (t, a) in enumerate(zip(trajectories, advantages, strict=True)):
        p, r = len(t.prompt_ids), len(t.response_ids)
        ids[i, :p] = torch.from_numpy(t.prompt_ids.astype(np.int64))
        ids[i, p : p + r] = torch.from_numpy(t.response_ids.astype(np.int64))
        attn[i, : p + r] = 1
        # response token k sits at position p + k and is predicted by logits at p + k - 1
        cols = slice(p - 1, p - 1 + r)
        resp[i, cols] = torch.from_numpy(t.loss_mask.astype(np.float32))  # an episode's environment tokens: 0
        blp[i, cols] = torch.tensor(t.behavior_logprobs)
        adv[i, cols] = float(a)
        versions[i, cols] = torch.from_numpy(t.token_versions.astype(np.int64))
    return TrainBatch(ids, attn, resp, blp, adv, versions, routed_experts=collate_routing(trajectories, width))


def collate_routing(trajectories: list[Trajectory], width: int) -> torch.Tensor | None:
    shapes = {t.routing_shape for t in trajectories if len(t.routed_experts)}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"trajectories of one batch carry routing of different shapes: {sorted(shapes)}")
    out = torch.full((len(trajectories), width, *shapes.pop()), -1, dtype=torch.int16)
    for i, t in enumerate(trajectories):
        routing = t.routing()
        if routing is not None:
            out[i, : len(routing)] = torch.from_numpy(routing.astype(np.int16))
    return out


def micro_batches(lengths: list[int] | np.ndarray, token_budget: int) -> list[list[int]]:
    """Row indices per micro-batch: length-sorted, each holding rows x max length <= budget
    (a single row longer than the budget gets a micro-batch of its own)."""
    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
    out: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        longest_if_added = max(longest, int(lengths[i]))
        if current and longest_if_added * (len(current) + 1) > token_budget:
            out.append(current)
            current, longest_if_added = [], int(lengths[i])
        current.append(i)
        longest = longest_if_added
    if current:
        out.append(current)
    return out


def trim(batch: TrainBatch) -> TrainBatch:
    """Drop trailing columns that are padding in every row of this (micro-)batch."""
    width = int(batch.attention_mask.sum(-1).max().item()) if batch.num_rows else 1
    width = max(width, 2)
    return batch.map(lambda t: t[:, : width if t.shape[1] == batch.input_ids.shape[1] else width - 1])
