"""What a model costs a cluster, from its shape alone: learner memory per rank, the bytes of a
weight broadcast, decode and training FLOPs, for a dense model or a Mixture-of-Experts one.

`vespo plan --model NAME` prints these lines under the placement plan and `bench.simulate
--model NAME` times with them. An MoE model is sized by ALL its parameters where weights are
stored or moved (memory, ZeRO shards, a broadcast, a decode step at large batch) and by its
ACTIVE parameters where tokens are computed (FLOPs). With an `Adapter` (learner.lora) the base
weights are frozen: only the adapter has gradients and optimizer moments, and a sync sends only
the adapter. Estimates, not measurements: each assumption is named where it is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from weightsync.adapter import MAX_LORA_RANKS

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
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module a layer has, by the name LoRA targets it by:
        the attention projections, and a dense model's MLP. An MoE's experts (transformers 5) are
        fused 3-D parameters of one module, not linear modules: PEFT's target_modules do not
        reach them, nor the router (not a Linear either)."""
        shapes = {"q_proj": (self.hidden, self.q_dim), "k_proj": (self.hidden, self.kv_dim),
                  "v_proj": (self.hidden, self.kv_dim), "o_proj": (self.q_dim, self.hidden)}  # fmt: skip
        if not self.moe:
            shapes.update(gate_proj=(self.hidden, self.ffn), up_proj=(self.hidden, self.ffn),
                          down_proj=(self.ffn, self.hidden))  # fmt: skip
        return shapes

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


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter of `rank` on a profile (learner.lora): lora_A (rank x in) and lora_B
    (out x rank) for each target module of every layer. Targets match by their last name part,
    as PEFT matches them."""

    profile: ModelProfile
    rank: int
    targets: tuple[str, ...]

    @classmethod
    def of(cls, profile: ModelProfile, rank: int, targets: Sequence[str]) -> Adapter:
        return cls(profile, rank, tuple(t.rsplit(".", 1)[-1] for t in targets))

    @property
    def reached(self) -> list[str]:
        return [t for t in self.targets if t in self.profile.linear_shapes]

    @property
    def missed(self) -> list[str]:
        """Targets that name no linear module of a layer of this profile."""
        return [t for t in self.targets if t not in self.profile.linear_shapes]

    @property
    def params(self) -> float:
        shapes = self.profile.linear_shapes
        return self.profile.layers * sum(self.rank * (shapes[t][0] + shapes[t][1]) for t in self.reached)

    def sync_bytes(self, bf16: bool = True) -> float:
        """What a sync sends: the adapter only, in the learner's dtype."""
        return (2 if bf16 else 4) * self.params


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


def state_bytes(p: ModelProfile, zero_stage: int, ranks: int, bf16: bool = True,
                adapter: Adapter | None = None) -> dict[str, float]:  # fmt: skip
    """Bytes per learner rank of the model's training state (the ZeRO paper's mixed-precision
    AdamW: bf16 weights and grads, fp32 master and two moments, 16 bytes a parameter; fp32
    without bf16), each split over the ranks from its ZeRO stage up: optimizer states at 1,
    grads at 2, weights at 3. ZeRO-3 adds the parameters it keeps gathered. With an adapter the
    base weights are frozen (weights only, in the learner's dtype) and the rest is the adapter's."""

    def split(n: float, stage: int) -> float:
        return n / ranks if zero_stage >= stage else n

    weight, master, grad = (2, 4, 2) if bf16 else (4, 0, 4)
    trained = p.params if adapter is None else adapter.params
    out = {"weights": weight * split(p.params, 3)}
    if adapter is not None:
        out = {"frozen weights": out["weights"], "adapter": weight * split(trained, 3)}
    out.update({"fp32 master": master * split(trained, 1), "Adam": 8 * split(trained, 1),
                "grads": grad * split(trained, 2)})  # fmt: skip
    if zero_stage == 3:
        out["gathered"] = weight * min(ZERO3_LIVE_PARAMS, p.params)
    return out


def zero3_traffic_bytes(p: ModelProfile, ranks: int, adapter: Adapter | None = None) -> float:
    """What ZeRO-3 moves per rank each micro-batch: the bf16 weights gathered for the forward
    and again for the backward, and the grads reduce-scattered (with an adapter, its grads
    only); every expert, used or not (an MoE layer's experts are one parameter in transformers 5)."""
    grads = p.weight_bytes if adapter is None else adapter.sync_bytes()
    return (2 * p.weight_bytes + grads) * (ranks - 1) / ranks


def alltoall_bytes(p: ModelProfile, tokens: int, ep: int) -> float:
    """Expert parallelism over `ep` ranks: each MoE layer sends every token's hidden state to its
    experts and back, forward and backward (bf16), the share of other ranks crossing the network."""
    return 4 * p.experts_per_token * p.hidden * 2 * p.layers * tokens * (ep - 1) / ep


def train_flops(p: ModelProfile, tokens: float, adapter: Adapter | None = None) -> float:
    """Forward + backward: 6 FLOPs per active parameter a token. With an adapter the frozen
    base computes no weight gradients (4 a parameter: forward and input gradients) and the
    adapter 6 of its own."""
    if adapter is None:
        return 6 * p.active_params * tokens
    return (4 * p.active_params + 6 * adapter.params) * tokens


def total_bytes(p: ModelProfile, zero_stage: int, ranks: int, bf16: bool, micro_batch_tokens: int,
                adapter: Adapter | None = None) -> float:  # fmt: skip
    return sum(state_bytes(p, zero_stage, ranks, bf16, adapter).values()) + p.activation_bytes(micro_batch_tokens)


def ranks_needed(p: ModelProfile, zero_stage: int, bf16: bool, micro_batch_tokens: int,
                 adapter: Adapter | None = None, most: int = 4096) -> int | None:  # fmt: skip
    """The fewest learner ranks whose per-rank memory fits GPU_BYTES (None: no count up to
    `most` does, e.g. when the activations alone do not fit)."""
    for ranks in range(1, most + 1):
        if total_bytes(p, zero_stage, ranks, bf16, micro_batch_tokens, adapter) <= GPU_BYTES:
            return ranks
    return None


def _gb(v: float) -> str:
    return f"{v / 1e9:.1f}" if v >= 0.1e9 or v == 0 else f"{v / 1e9:.3f}"


def vllm_max_lora_rank(rank: int) -> int | None:
    """The engines' max_lora_rank (weightsync.adapter.vllm_max_rank), or None where vLLM has none."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), None)


def adapter_lines(a: Adapter, *, bf16: bool, receivers: int) -> list[str]:
    """What the adapter is and what a sync of it sends."""
    p, g = a.profile, 1e9
    targets = ", ".join(a.reached) or "nothing"
    lines = [f"LoRA (learner.lora): rank {a.rank} on {targets} of each of {p.layers} layers = "
             f"{a.params / 1e6:.2f}M adapter parameters, the only ones that train (base weights frozen)"]  # fmt: skip
    experts = [t for t in a.missed if p.moe and t in ("gate_proj", "up_proj", "down_proj")]
    if experts:
        lines.append(
            f"  {', '.join(experts)}: no such module in {p.name}: its experts are fused 3-D parameters (transformers "
            "5) that LoRA's target_modules do not reach, and it has no dense MLP; preflight refuses these targets, "
            "so these figures are of the attention projections (learner.lora.target_modules=[q_proj,k_proj,v_proj,"
            "o_proj])"
        )
    others = [t for t in a.missed if t not in experts]
    if others:
        lines.append(f"  {', '.join(others)}: not counted (only the per-layer projections are sized here)")
    vllm_rank = vllm_max_lora_rank(a.rank)
    served = (f"loaded into vLLM's LoRA (max_lora_rank {vllm_rank}, in memory)" if vllm_rank else
              f"rank {a.rank} is over vLLM's largest max_lora_rank {MAX_LORA_RANKS[-1]}: refused")  # fmt: skip
    sent = a.sync_bytes(bf16)
    lines.append(
        f"weight sync: {sent / 1e6:.1f} MB an update, the adapter only ({2 if bf16 else 4} bytes x "
        f"{a.params / 1e6:.2f}M: lora_A rank x in, lora_B out x rank) to {receivers} receiver(s), {served}; "
        f"full fine-tuning sends {p.weight_bytes / g:.1f} GB ({p.weight_bytes / sent:,.0f}x)"
    )
    return lines


def ranks_line(p: ModelProfile, zero_stage: int, bf16: bool, micro_batch_tokens: int,
               adapter: Adapter | None) -> str:  # fmt: skip
    """The fewest learner ranks that fit, with the adapter and without; where none fits at
    micro_batch_tokens, the largest halving of it at which both do."""
    runs = ([("LoRA", adapter)] if adapter else []) + [("full fine-tuning", None)]

    def needed(tokens: int) -> list[int | None]:
        return [ranks_needed(p, zero_stage, bf16, tokens, a) for _, a in runs]

    def text(counts: list[int | None]) -> str:
        if not any(counts):
            return "none"
        return ", ".join(f"{label} {n if n else 'none'}" for (label, _), n in zip(runs, counts, strict=True))

    head = f"learner ranks needed to fit an 80 GB H100 (ZeRO-{zero_stage})"
    counts = needed(micro_batch_tokens)
    if all(counts):
        return f"{head} at micro_batch_tokens {micro_batch_tokens}: {text(counts)}"
    line = (f"{head}: {text(counts)} at micro_batch_tokens {micro_batch_tokens} (activations alone "
            f"~{p.activation_bytes(micro_batch_tokens) / 1e9:.0f} GB)")  # fmt: skip
    tokens = micro_batch_tokens // 2
    while tokens >= 1 and not all(needed(tokens)):
        tokens //= 2
    return line + (f"; at micro_batch_tokens {tokens}: {text(needed(tokens))}" if tokens >= 1 else "")


def describe(p: ModelProfile, *, zero_stage: int, ranks: int, bf16: bool, micro_batch_tokens: int, tp: int,
             receivers: int, step_tokens: float, step_note: str,
             adapter: Adapter | None = None) -> list[str]:  # fmt: skip
    """The lines `vespo plan --model` and `bench.simulate --model` print (with `adapter`: of a
    learner.lora run)."""
    g = 1e9
    kind = f"{p.experts} experts, {p.experts_per_token} a token" if p.moe else "dense"
    states = state_bytes(p, zero_stage, ranks, bf16, adapter)
    acts = p.activation_bytes(micro_batch_tokens)
    total = sum(states.values()) + acts
    fits = "fits" if total <= GPU_BYTES else "over"
    lines = [
        f"model {p.name}: {p.params / g:.2f}B parameters, {p.active_params / g:.2f}B active a token ({kind}; "
        f"{p.source})",
        f"learner memory per rank (ZeRO-{zero_stage} over {ranks} rank(s), {'bf16' if bf16 else 'fp32'}"
        + (", LoRA" if adapter else "")
        + "): "
        + " + ".join(f"{k} {_gb(v)}" for k, v in states.items())
        + f" = {sum(states.values()) / g:.1f} GB; activations ~{acts / g:.1f} GB at micro_batch_tokens "
        f"{micro_batch_tokens} (assumed {p.activation_bytes(1) / 1e6:.1f} MB a token: bf16, every layer kept for "
        f"the backward); {total / g:.0f} GB in all, {fits} an 80 GB H100",
        ranks_line(p, zero_stage, bf16, micro_batch_tokens, adapter),
    ]
    if adapter:
        lines[1:1] = adapter_lines(adapter, bf16=bf16, receivers=receivers)
    else:
        lines.append(
            f"weight sync: {p.weight_bytes / g:.1f} GB a broadcast (2 bytes x {p.params / g:.2f}B"
            + (", every expert" if p.moe else "")
            + f") to {receivers} receiver(s); {p.weight_bytes / tp / g:.1f} GB a GPU at engine TP {tp}"
        )
    decode = f"decode: {2 * p.active_params / g:.1f} GFLOPs a token (2 x active)"
    if p.moe:
        reads = ", ".join(f"{p.experts_read(b):.0f} at {b} ({p.decode_bytes(b) / g:.1f} GB)" for b in (8, 64, 256))
        decode += (f"; a step reads the non-expert weights ({p.decode_bytes(0) / g:.1f} GB) and the experts its "
                   f"sequences route to (uniform routing assumed): {p.experts_per_token} of {p.experts} a layer at 1 "
                   f"sequence ({p.decode_bytes(1) / g:.1f} GB in all), {reads}")  # fmt: skip
    else:
        decode += f"; a step reads all {p.weight_bytes / g:.1f} GB of weights"
    lines.append(decode)
    flops = train_flops(p, step_tokens, adapter)
    per_token = f"{train_flops(p, 1, adapter) / g:.1f} GFLOPs a token, {flops / 1e15:,.0f} PFLOPs a step ({step_note})"
    if adapter:
        train = (f"training: 4 x {p.active_params / g:.2f}B active (frozen: no weight gradients) + 6 x "
                 f"{adapter.params / 1e6:.2f}M adapter = {per_token}")  # fmt: skip
    else:
        train = f"training: 6 x {p.active_params / g:.2f}B active = {per_token}"
    if zero_stage == 3:
        grads = "the adapter's grads" if adapter else "grads"
        train += (f"; ZeRO-3 moves {zero3_traffic_bytes(p, ranks, adapter) / g:.0f} GB a rank every micro-batch "
                  f"(weights gathered for forward and backward, {grads} reduce-scattered)")  # fmt: skip
    lines.append(train)
    if p.moe and not adapter:
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
