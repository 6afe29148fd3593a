"""The cost model behind bench.simulate: how long decoding, a learner step and a weight
broadcast take for a 7B model on H100s (or another profile of vespo/config/model_profile.py:
`CostModel.of`), and how long the responses are.

Every number is a named constant with where it comes from. Published measurements are used
where one exists; the rest is derived from the hardware's datasheet limits and says so. The
simulation only needs ratios to be right (generation vs training vs broadcast), so each
constant is rounded, not fitted.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from vespo.config.model_profile import QWEN25_7B, ModelProfile, zero3_traffic_bytes

# -- the model: Qwen2.5-7B, the base of the 7B runs the async-RL papers report ----------------
# (its shape and sources: vespo/config/model_profile.py)
PARAMS = QWEN25_7B.params  # 7.61B
WEIGHT_BYTES = QWEN25_7B.weight_bytes  # bf16 weights: what one decode step reads and one broadcast sends
KV_BYTES_PER_TOKEN = QWEN25_7B.kv_bytes_per_token  # K and V in bf16: 57,344 B per token

# -- the GPU: NVIDIA H100 SXM 80GB datasheet ----------------------------------------------------
H100_BF16_FLOPS = 989e12  # dense BF16 tensor-core peak
H100_HBM_BYTES_S = 3.35e12  # HBM3 bandwidth
H100_MEMORY_BYTES = 80e9

# -- decode on one engine (vLLM, one H100 per engine) ---------------------------------------------
# vLLM reaches 77% of the memory-bandwidth roof decoding Llama-3.1-8B at one request (75 tokens/s
# on an A100-40GB, johnmusgrave.com/p/vllm-throughput-latency-sweep-on); the same share of the
# H100's bandwidth is assumed for reading weights and KV cache at any batch size.
HBM_EFFICIENCY = 0.77
# The GEMMs of a decode step at large batch: half of peak (assumed; it is under 20% of a step here).
DECODE_COMPUTE_EFFICIENCY = 0.5
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of GPU memory for weights + KV cache
ACTIVATION_RESERVE_BYTES = 4e9  # CUDA graphs, activations, sampler buffers (assumed)
PROMPT_TOKENS = 300  # a math problem in a chat template with a reasoning instruction (assumed)

# -- response lengths: long-tailed, capped at 16k ------------------------------------------------
# Output lengths of reasoning models are long-tailed and commonly modelled as lognormal; the
# parameters are chosen (not fitted) so that a 16k-capped 7B reasoning-RL rollout has a median
# near 3k tokens, a mean near 4.3k and a few percent of responses cut at the cap, the range the
# response-length curves of R1-style 7B runs show (DeepScaleR, AReaL, DAPO report 3-6k means).
# Part of the spread is the prompt's (hard problems make all 8 samples long), part the sample's.
LENGTH_MEDIAN = 3000
LENGTH_SIGMA_PROMPT = 0.6
LENGTH_SIGMA_SAMPLE = 0.7
MAX_RESPONSE_TOKENS = 16384

# -- the learner: DeepSpeed/Megatron on H100s ------------------------------------------------------
TRAIN_MFU = 0.40  # typical model-FLOPs utilisation of dense 7B training (Llama 3 reports 38-43%)
TRAIN_TOKENS_S_PER_GPU = TRAIN_MFU * H100_BF16_FLOPS / (6 * PARAMS)  # 6 FLOPs per param per token
# A step's cost besides the tokens: gradient reduce of 15 GB over 16 ranks at ~50 GB/s (about
# 0.6 s, only partly hidden behind the backward), the optimizer step, data loading (first
# principles, rounded up).
TRAIN_STEP_OVERHEAD_S = 2.0
# Under ZeRO-3 (the 30B profile) every micro-batch gathers the weights twice and reduce-scatters
# the grads (model_profile.zero3_traffic_bytes), at a 400 Gb/s NIC per GPU (assumed) and hidden
# behind the compute as far as it goes: a micro-batch takes the longer of the two. Micro-batch:
# learner.micro_batch_tokens of deploy/configs/paper_async_30b.yaml.
LEARNER_NET_BYTES_S = 50e9
MICRO_BATCH_TOKENS = 16384

# -- weight broadcast: learner rank 0 -> every engine -------------------------------------------
# NCCL broadcast from the master rank to rollout GPUs on another node ran at ~25 GB/s (one NIC;
# verl-project/verl#7167).
BROADCAST_BYTES_S = 25e9
# vLLM loads a 7-8B bf16 model's new weights in 2.3-3.3 s (reload timings in vllm-project/vllm#48382);
# pause, cache reset and resume add little. Generation is paused for the whole broadcast.
BROADCAST_LATENCY_S = 2.5

# -- the controller's remote calls (Ray) ------------------------------------------------------------
RAY_CALL_S = 1 / 2018  # "1:1 async-actor calls sync": 2,018/s in `ray microbenchmark` (ray-project/ray#16222)
RAY_CALL_CPU_S = 1 / 14090  # caller CPU per call: "single client tasks async" 14,090/s, same run

# -- policy drift per version, what buffer.divergence_budget reads ----------------------------------
# The learner reports KL(mu || pi) per response token by lag (learner.divergence_metrics). Here it
# is the engine/learner mismatch at lag 0 plus a drift linear in the updates between sampling and
# training, times one batch's lognormal noise. The numbers are the long-answer task's on this
# machine (docs/results.md: about 0.0002 at lag 0, 0.0004 more a version, one batch's value at a
# lag varying several-fold). A 7B run's drift per version depends on its learning rate and is not
# published: these set the scale of a budget, they are not a prediction.
KL_MISMATCH = 2e-4
KL_PER_VERSION = 4e-4
KL_NOISE_SIGMA = 0.5


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma_prompt: float, sigma_sample: float,
                      cap: int) -> np.ndarray:  # fmt: skip
    z = sigma_prompt * rng.standard_normal() + sigma_sample * rng.standard_normal(n)
    return np.clip(np.exp(math.log(median) + z), 1, cap).astype(np.int64)


@dataclass
class CostModel:
    """The numbers one simulated run uses (the defaults: the constants above)."""

    decode_base_s: float = WEIGHT_BYTES / (H100_HBM_BYTES_S * HBM_EFFICIENCY)  # a decode step's weight read
    kv_bytes_per_token: float = KV_BYTES_PER_TOKEN
    hbm_bytes_s: float = H100_HBM_BYTES_S * HBM_EFFICIENCY
    decode_flops_s: float = H100_BF16_FLOPS * DECODE_COMPUTE_EFFICIENCY
    kv_cache_bytes: float = H100_MEMORY_BYTES * GPU_MEMORY_UTILIZATION - WEIGHT_BYTES - ACTIVATION_RESERVE_BYTES
    prompt_tokens: int = PROMPT_TOKENS
    length_median: float = LENGTH_MEDIAN
    sigma_prompt: float = LENGTH_SIGMA_PROMPT
    sigma_sample: float = LENGTH_SIGMA_SAMPLE
    max_response: int = MAX_RESPONSE_TOKENS
    train_tokens_s_per_rank: float = TRAIN_TOKENS_S_PER_GPU
    train_overhead_s: float = TRAIN_STEP_OVERHEAD_S
    broadcast_s: float = WEIGHT_BYTES / BROADCAST_BYTES_S + BROADCAST_LATENCY_S
    # the learner group's driver (in the controller's process) pads the batch to its longest row
    # and splits it over the ranks before they start: seconds per padded cell, measured by
    # bench.simulate on this machine (0: left out)
    driver_cell_s: float = 0.0
    kl_mismatch: float = KL_MISMATCH
    kl_per_version: float = KL_PER_VERSION
    kl_noise_sigma: float = KL_NOISE_SIGMA
    profile: ModelProfile = QWEN25_7B  # its active parameters set the FLOPs; an MoE's experts the reads
    notes: tuple[str, ...] = ()  # more lines for describe()

    @classmethod
    def of(cls, profile: ModelProfile, ranks: int) -> CostModel:
        """The cost model of a profile: engines of profile.engine_gpus H100s (tensor parallel, its
        all-reduces left out), broadcast load time in proportion to the bytes each engine GPU
        keeps, the learner at the profile's ZeRO stage over `ranks` (of the 7B profile: CostModel())."""
        tp, w = profile.engine_gpus, profile.weight_bytes
        hbm = tp * H100_HBM_BYTES_S * HBM_EFFICIENCY
        compute = TRAIN_MFU * H100_BF16_FLOPS / (6 * profile.active_params)
        rate, notes = compute, []
        if profile.moe:
            reads = ", ".join(f"{(profile.decode_bytes(b) - profile.decode_bytes(0)) / hbm * 1e3:.1f} ms at {b}"
                              for b in (1, 64, 256))  # fmt: skip
            notes.append(
                f"engines: TP {tp} ({tp} H100s, all-reduce left out); a decode step also reads the experts its "
                f"sequences route to ({profile.experts_per_token} of {profile.experts} a token, uniform): {reads}"
            )
        if profile.zero_stage == 3:
            traffic = zero3_traffic_bytes(profile, ranks)
            rate = min(compute, MICRO_BATCH_TOKENS * LEARNER_NET_BYTES_S / traffic)
            notes.append(
                f"learner: ZeRO-3 over {ranks} ranks, {traffic / 1e9:.0f} GB a rank every micro-batch of "
                f"{MICRO_BATCH_TOKENS} tokens at {LEARNER_NET_BYTES_S / 1e9:.0f} GB/s: "
                f"{MICRO_BATCH_TOKENS * LEARNER_NET_BYTES_S / traffic:.0f} tokens/s a rank, against "
                f"{compute:.0f} from 6 x {profile.active_params / 1e9:.2f}B active at {TRAIN_MFU:.0%} MFU"
            )
        load_s = BROADCAST_LATENCY_S * (w / tp) / WEIGHT_BYTES
        return cls(
            decode_base_s=profile.decode_bytes(0) / hbm, kv_bytes_per_token=profile.kv_bytes_per_token,
            hbm_bytes_s=hbm, decode_flops_s=tp * H100_BF16_FLOPS * DECODE_COMPUTE_EFFICIENCY,
            kv_cache_bytes=tp * H100_MEMORY_BYTES * GPU_MEMORY_UTILIZATION - w - tp * ACTIVATION_RESERVE_BYTES,
            train_tokens_s_per_rank=rate, broadcast_s=w / BROADCAST_BYTES_S + load_s, profile=profile,
            notes=tuple(notes),
        )  # fmt: skip

    def __post_init__(self) -> None:
        lengths = lognormal_lengths(np.random.default_rng(0), 200_000, self.length_median, 0.0,
                                    math.hypot(self.sigma_prompt, self.sigma_sample), self.max_response)  # fmt: skip
        self.mean_length = float(lengths.mean())
        self.truncated = float((lengths >= self.max_response).mean())
        # a running sequence's context, averaged over the batch: long responses stay in it longer
        self.mean_context = self.prompt_tokens + float((lengths.astype(float) ** 2).mean() / (2 * lengths.mean()))
        self.per_seq_s = (
            self.mean_context * self.kv_bytes_per_token / self.hbm_bytes_s
            + 2 * self.profile.active_params / self.decode_flops_s
        )
        self.max_seqs = max(1, int(self.kv_cache_bytes / self.kv_bytes_per_token / self.mean_context))

    def seq_tokens_s(self, batch: int) -> float:
        """Tokens/s of each of `batch` sequences decoding together: a step reads the weights once
        and every sequence's KV cache (continuous batching); an MoE's step also reads the experts
        its sequences route to."""
        return 1.0 / (self.decode_base_s + self.experts_s(batch) + self.per_seq_s * batch)

    def experts_s(self, batch: int) -> float:
        p = self.profile
        return (p.decode_bytes(batch) - p.decode_bytes(0)) / self.hbm_bytes_s if p.moe else 0.0

    def engine_tokens_s(self, batch: int) -> float:
        return batch * self.seq_tokens_s(batch)

    def group_lengths(self, group_id: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Response lengths and 0/1 rewards of a group, fixed by its id: every mode and layout
        that hands out a prompt generates the same work for it."""
        rng = np.random.default_rng(zlib.crc32(group_id.encode()))
        lengths = lognormal_lengths(rng, n, self.length_median, self.sigma_prompt, self.sigma_sample, self.max_response)
        return lengths, rng.integers(0, 2, n)

    def batch_kl(self, lag: int, version: int) -> float:
        """The KL per token a batch trained at `version` measures on its data `lag` versions old,
        fixed by the two: every layout sees the same noise at the same step and lag."""
        noise = np.random.default_rng([version, lag]).standard_normal()
        return (self.kl_mismatch + self.kl_per_version * lag) * math.exp(self.kl_noise_sigma * noise)

    def train_s(self, tokens: int, ranks: int) -> float:
        return tokens / (self.train_tokens_s_per_rank * ranks) + self.train_overhead_s

    def driver_s(self, rows: int, width: int) -> float:
        return self.driver_cell_s * rows * width

    def describe(self) -> list[str]:
        return [
            f"decode: {self.decode_base_s * 1e3:.1f} ms/step + {self.per_seq_s * 1e3:.3f} ms per sequence (mean "
            f"context {self.mean_context:.0f} tokens); per engine {self.engine_tokens_s(1):.0f} tokens/s at 1 "
            f"sequence, {self.engine_tokens_s(64):.0f} at 64, {self.engine_tokens_s(self.max_seqs):.0f} at its "
            f"KV-cache limit of {self.max_seqs}",
            f"responses: lognormal, median {self.length_median:.0f}, mean {self.mean_length:.0f}, "
            f"{self.truncated:.1%} cut at {self.max_response}",
            f"learner: {self.train_tokens_s_per_rank:.0f} tokens/s per rank + {self.train_overhead_s:.1f} s a step; "
            f"weight broadcast {self.broadcast_s:.2f} s (engines paused)",
            f"drift: KL per token {self.kl_mismatch:g} at lag 0 + {self.kl_per_version:g} a version, lognormal "
            f"noise sigma {self.kl_noise_sigma:g} per batch and lag",
            *self.notes,
        ]
