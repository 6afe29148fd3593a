"""What a model costs a cluster, from its shape alone: learner memory per rank, the bytes of a
weight broadcast, decode and training FLOPs, for a dense model or a Mixture-of-Experts one.

`vespo plan --model NAME` prints these lines under the placement plan and `bench.simulate
--model NAME` times with them. An MoE model is sized by ALL its parameters where weights are
stored or moved (memory, ZeRO shards, a broadcast, a decode step at large batch) and by its
ACTIVE parameters where tokens are computed (FLOPs). Estimates, not measurements: each
assumption is named where it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GPU_BYTES = 80e9  # NVIDIA H100 SXM 80GB
# DeepSpeed's stage3_max_live_parameters default: parameters ZeRO-3 keeps gathered at once
ZERO3_LIVE_PARAMS = 1e9


@dataclass(frozen=True)
class ModelProfile:
    name: str
    params: float  # all parameters: what is stored, sharded and broadcast
    active_params: float  # parameters one token goes through: what its FLOPs scale with
    layers: int
    hidden: int
    q_dim: int  # query heads x head_dim
    kv_dim: int  # KV heads x head_dim
    ffn: int  # MLP width: the dense MLP's, or one expert's
    experts: int = 0  # routed experts a layer; 0: a dense model
    experts_per_token: int = 1
    engine_gpus: int = 1  # tensor-parallel size of an engine in the paper's layout
    zero_stage: int = 2  # the learner's ZeRO stage in the paper's layout
    source: str = ""

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def expert_params(self) -> float:
        """Parameters in routed experts (gate, up and down projections of each)."""
        return self.layers * self.experts * 3 * self.hidden * self.ffn

    @property
    def weight_bytes(self) -> float:
        """bf16 weights, every expert included: what one broadcast sends."""
        return 2 * self.params

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * 2  # K and V in bf16

    def experts_read(self, batch: int) -> float:
        """Distinct experts a layer that a decode step of `batch` sequences reads, each token
        routed to experts_per_token of them uniformly and independently (assumed; real routing
        is skewed, so fewer)."""
        if not self.moe:
            return 0.0
        return self.experts * (1 - (1 - self.experts_per_token / self.experts) ** batch)

    def decode_bytes(self, batch: int) -> float:
        """bf16 weights one decode step reads: all but the experts, and the experts its tokens use."""
        if not self.moe:
            return self.weight_bytes
        return 2 * (self.params - self.expert_params) + 2 * self.expert_params * self.experts_read(batch) / self.experts

    def activation_bytes(self, tokens: int) -> float:
        """Activations one micro-batch keeps for its backward (bf16, every layer: the learner does
        not checkpoint activations). Per token and layer, as Korthikanti et al. 2022 (arXiv
        2205.05198) count them without dropout and with flash attention, for SwiGLU MLPs: two
        norms' inputs, attention's input, Q and output, K and V, and for each MLP a token goes
        through its input and the gate, up, activation and product outputs."""
        values = 3 * self.hidden + 2 * self.q_dim + 2 * self.kv_dim
        values += self.experts_per_token * (self.hidden + 4 * self.ffn)
        return 2 * values * self.layers * tokens


def qwen3_moe_params(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int, active: int,
                     ffn: int, vocab: int) -> tuple[float, float]:  # fmt: skip
    """(total, active) parameters of a Qwen3-MoE model from its config.json: untied embedding
    and output layer, per layer attention with Q/K norms, a router, experts and two norms."""
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 2 * head_dim
    shared = attention + hidden * experts + 2 * hidden
    outer = 2 * vocab * hidden + hidden
    expert = 3 * hidden * ffn
    return outer + layers * (shared + experts * expert), outer + layers * (shared + active * expert)


# Qwen2.5-7B: the model card's 7.61B parameters; shape from its config.json (28 layers, hidden
# 3584, 28 query / 4 KV heads of 128, MLP 18944)
QWEN25_7B = ModelProfile("qwen2.5-7b", 7.61e9, 7.61e9, layers=28, hidden=3584, q_dim=28 * 128, kv_dim=4 * 128,
                         ffn=18944, source="Qwen2.5-7B model card and config.json")  # fmt: skip
# Qwen3-30B-A3B config.json (as NVIDIA Megatron-Bridge and Ascend MindSpeed-RL's qwen3_30b_a3b.yaml
# restate it): 48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts of width 768,
# 8 a token, vocabulary 151,936, untied. The count below gives 30.53B / 3.35B, the model card's
# "30.5B in total and 3.3B activated". Engines TP 4 and ZeRO-3: deploy/configs/paper_async_30b.yaml.
_TOTAL, _ACTIVE = qwen3_moe_params(48, 2048, 32, 4, 128, 128, 8, 768, 151_936)
QWEN3_30B_A3B = ModelProfile("qwen3-30b-a3b", _TOTAL, _ACTIVE, layers=48, hidden=2048, q_dim=32 * 128,
                             kv_dim=4 * 128, ffn=768, experts=128, experts_per_token=8, engine_gpus=4, zero_stage=3,
                             source="Qwen3-30B-A3B model card and config.json")  # fmt: skip
PROFILES = {p.name: p for p in (QWEN25_7B, QWEN3_30B_A3B)}


def state_bytes(p: ModelProfile, zero_stage: int, ranks: int, bf16: bool = True) -> dict[str, float]:
    """Bytes per learner rank of the model's training state (the ZeRO paper's mixed-precision
    AdamW: bf16 weights and grads, fp32 master and two moments, 16 bytes a parameter; fp32
    without bf16), each split over the ranks from its ZeRO stage up: optimizer states at 1,
    grads at 2, weights at 3. ZeRO-3 adds the parameters it keeps gathered."""

    def split(stage: int) -> float:
        return p.params / ranks if zero_stage >= stage else p.params

    weight, master, grad = (2, 4, 2) if bf16 else (4, 0, 4)
    out = {"weights": weight * split(3), "fp32 master": master * split(1), "Adam": 8 * split(1),
           "grads": grad * split(2)}  # fmt: skip
    if zero_stage == 3:
        out["gathered"] = weight * min(ZERO3_LIVE_PARAMS, p.params)
    return out


def zero3_traffic_bytes(p: ModelProfile, ranks: int) -> float:
    """What ZeRO-3 moves per rank each micro-batch: the bf16 weights gathered for the forward
    and again for the backward, and the grads reduce-scattered; every expert, used or not (an
    MoE layer's experts are one parameter in transformers 5)."""
    return 3 * p.weight_bytes * (ranks - 1) / ranks


def alltoall_bytes(p: ModelProfile, tokens: int, ep: int) -> float:
    """Expert parallelism over `ep` ranks: each MoE layer sends every token's hidden state to its
    experts and back, forward and backward (bf16), the share of other ranks crossing the network."""
    return 4 * p.experts_per_token * p.hidden * 2 * p.layers * tokens * (ep - 1) / ep


def train_flops(p: ModelProfile, tokens: float) -> float:
    return 6 * p.active_params * tokens  # forward + backward: 6 FLOPs per active parameter a token


def describe(p: ModelProfile, *, zero_stage: int, ranks: int, bf16: bool, micro_batch_tokens: int, tp: int,
             receivers: int, step_tokens: float, step_note: str) -> list[str]:  # fmt: skip
    """The lines `vespo plan --model` and `bench.simulate --model` print."""
    g = 1e9
    kind = f"{p.experts} experts, {p.experts_per_token} a token" if p.moe else "dense"
    states = state_bytes(p, zero_stage, ranks, bf16)
    acts = p.activation_bytes(micro_batch_tokens)
    total = sum(states.values()) + acts
    fits = "fits" if total <= GPU_BYTES else "over"
    lines = [
        f"model {p.name}: {p.params / g:.2f}B parameters, {p.active_params / g:.2f}B active a token ({kind}; "
        f"{p.source})",
        f"learner memory per rank (ZeRO-{zero_stage} over {ranks} rank(s), {'bf16' if bf16 else 'fp32'}): "
        + " + ".join(f"{k} {v / g:.1f}" for k, v in states.items())
        + f" = {sum(states.values()) / g:.1f} GB; activations ~{acts / g:.1f} GB at micro_batch_tokens "
        f"{micro_batch_tokens} (assumed {p.activation_bytes(1) / 1e6:.1f} MB a token: bf16, every layer kept for "
        f"the backward); {total / g:.0f} GB in all, {fits} an 80 GB H100",
        f"weight sync: {p.weight_bytes / g:.1f} GB a broadcast (2 bytes x {p.params / g:.2f}B"
        + (", every expert" if p.moe else "")
        + f") to {receivers} receiver(s); {p.weight_bytes / tp / g:.1f} GB a GPU at engine TP {tp}",
    ]
    decode = f"decode: {2 * p.active_params / g:.1f} GFLOPs a token (2 x active)"
    if p.moe:
        reads = ", ".join(f"{p.experts_read(b):.0f} at {b} ({p.decode_bytes(b) / g:.1f} GB)" for b in (8, 64, 256))
        decode += (f"; a step reads the non-expert weights ({p.decode_bytes(0) / g:.1f} GB) and the experts its "
                   f"sequences route to (uniform routing assumed): {p.experts_per_token} of {p.experts} a layer at 1 "
                   f"sequence ({p.decode_bytes(1) / g:.1f} GB in all), {reads}")  # fmt: skip
    else:
        decode += f"; a step reads all {p.weight_bytes / g:.1f} GB of weights"
    lines.append(decode)
    flops = train_flops(p, step_tokens)
    train = (f"training: 6 x {p.active_params / g:.2f}B active = {train_flops(p, 1) / g:.1f} GFLOPs a token, "
             f"{flops / 1e15:,.0f} PFLOPs a step ({step_note})")  # fmt: skip
    if zero_stage == 3:
        train += (f"; ZeRO-3 moves {zero3_traffic_bytes(p, ranks) / g:.0f} GB a rank every micro-batch (weights "
                  "gathered for forward and backward, grads reduce-scattered)")  # fmt: skip
    lines.append(train)
    if p.moe:
        ep = math.gcd(p.experts, ranks)
        lines.append(
            f"expert parallelism (not in this learner: experts are ZeRO-sharded like any weight): EP {ep} would keep "
            f"{p.experts // ep} experts a layer whole on each rank and gather none ({p.expert_params / g:.1f}B expert "
            f"parameters, {16 * p.expert_params / ranks / g:.1f} GB of their training state a rank, as under ZeRO-3); "
            f"instead an all-to-all sends each token to its experts and back: "
            f"{alltoall_bytes(p, micro_batch_tokens, ep) / g:.0f} GB a rank per micro-batch of {micro_batch_tokens} "
            "tokens, forward and backward"
        )
    return lines
