"""The engine interface and what both engines share (device, dtype, imposed lengths).

Both engines keep the same contract: `generate` returns n `Completion`s whose tokens carry the
version of the weights they were sampled under; `receive_weights` / `load_weights` swap weights
in place and bump the version. With `partial_rollout`, in-flight requests are paused for the
swap and resume under the new weights (their old tokens keep their old tags); without it the
swap waits until in-flight requests finish. Which engine a run gets is `rollout.engine_factory`.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import torch

from rollout.config import RolloutConfig
from rollout.records import Completion


class Engine(Protocol):
    name: str
    version: int

    async def start(self) -> None: ...

    async def generate(
        self, prompt_ids: list[int], n: int, request_id: str, max_tokens: int | None = None
    ) -> list[Completion]:
        """n completions of at most `max_tokens` (default rollout.max_new_tokens) new tokens."""
        ...

    async def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, secret: str, bind: str
    ) -> None: ...

    async def receive_weights(self, plan_wire: list, version: int) -> int: ...

    async def load_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None: ...

    async def weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]: ...

    async def shutdown(self) -> None: ...

    def running(self) -> int:
        """Requests admitted to the engine and not finished (a weight swap without partial
        rollout waits for these)."""
        ...

    @property
    def num_receivers(self) -> int: ...


def moe_experts(model_path: str) -> int:
    """Routed experts per MoE layer of the model at model_path (0 for a dense model), from its
    config as the families name it (Qwen-MoE and OLMoE, Mixtral, DeepSeek)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    return int(next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                     if getattr(config, k, None)), 0))  # fmt: skip


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def imposed_lengths(cfg: RolloutConfig, request_id: str, n: int) -> list[int]:
    """n response lengths from a log-normal law (median rollout.imposed_median_tokens, log-space
    spread rollout.imposed_length_sigma), clipped to [1, max_new_tokens]: most responses short,
    a few at the cap, as in reasoning RL. Drawn from a generator seeded by rollout.seed and the
    request id, so the same request always gets the same lengths."""
    rng = random.Random(f"{cfg.seed}/{request_id}")
    median, sigma = cfg.imposed_median_tokens, cfg.imposed_length_sigma
    return [min(cfg.max_new_tokens, max(1, round(median * math.exp(sigma * rng.gauss(0, 1))))) for _ in range(n)]


def resolve_dtype(cfg: RolloutConfig) -> torch.dtype:
    """`auto` is bfloat16 on GPU, and on a CPU with native bf16 dot products too: there
    bench/dtype.py measured vLLM 1.3-1.5x faster than in float32 on smollm2-135m, for a
    train/inference gap (against a float32 learner) of ~0.03 nats per token, the kind of
    mismatch VESPO's sequence weight exists to correct. A CPU without them would emulate bf16,
    so it keeps float32; so do checks of exact engine/learner agreement, by asking for it."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() or cpu_has_bf16() else torch.float32
    return getattr(torch, cfg.dtype)


def cpu_has_bf16() -> bool:
    """x86 avx512_bf16 or AMX (torch's own capability probe; private, hence the getattr)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
