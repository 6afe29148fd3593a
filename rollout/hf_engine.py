"""The transformers `generate` engine: the fallback for machines where vLLM cannot start.

Same contract as the vLLM engine, simpler machinery: each request generates its n samples in
chunks of `hf_chunk_tokens`; a weight swap takes the model lock between chunks, so with
partial rollout an interrupted request resumes (re-encoding its prefix) under the new weights
and its new tokens get the new version. Without partial rollout, the swap waits for in-flight
requests and holds new ones back. Log-probs are taken from the processed scores (after
temperature, top-k, top-p), the distribution each token was drawn from.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from rollout.config import RolloutConfig
from rollout.engine import default_device, resolve_dtype
from rollout.records import Completion
from weightsync import transport as wb
from weightsync.adapter import AdapterMerger, is_adapter

log = logging.getLogger(__name__)


class TransformersEngine:
    name = "transformers"
    num_receivers = 1

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg
        self.version = 0
        self.device = default_device()
        self.model = None
        self.group: wb.WeightGroup | None = None
        self._merger: AdapterMerger | None = None  # learner.lora: adapters merged into the model here
        self._model_lock = asyncio.Lock()  # held while a chunk runs or weights are swapped
        self._idle = asyncio.Condition()  # in-flight count, for updates without partial rollout
        self._in_flight = 0
        self._updating = False
        self._generator = torch.Generator(device=self.device).manual_seed(cfg.seed)

    async def start(self) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(self.cfg.model_path, dtype=resolve_dtype(self.cfg))
        self.model.to(self.device).eval()
        self.generation_config = GenerationConfig.from_model_config(self.model.config)
        self.eos = set(_as_list(self.generation_config.eos_token_id))
        pad = self.generation_config.pad_token_id
        self.pad = pad if pad is not None else next(iter(self.eos), 0)

    def running(self) -> int:
        return self._in_flight

    async def generate(
        self, prompt_ids: list[int], n: int, request_id: str, max_tokens: int | None = None
    ) -> list[Completion]:
        async with self._idle:
            await self._idle.wait_for(lambda: not self._updating)
            self._in_flight += 1
        try:
            return await self._generate(prompt_ids, n, max_tokens or self.cfg.max_new_tokens)
        finally:
            async with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    async def _generate(self, prompt_ids: list[int], n: int, max_tokens: int) -> list[Completion]:
        cfg = self.cfg
        version_start = self.version
        rows = [Completion([], [], [], "", version_start, version_start) for _ in range(n)]
        active = list(range(n))
        chunk = cfg.hf_chunk_tokens if cfg.partial_rollout else max_tokens
        while active:
            budget = min(chunk, max_tokens - len(rows[active[0]].token_ids))
            async with self._model_lock:
                version = self.version
                prefixes = [prompt_ids + rows[i].token_ids for i in active]
                tokens, logprobs = await asyncio.to_thread(self._step, prefixes, budget)
            still = []
            for i, toks, lps in zip(active, tokens, logprobs, strict=True):
                row = rows[i]
                for tok, lp in zip(toks, lps, strict=True):
                    row.token_ids.append(tok)
                    row.logprobs.append(lp)
                    row.versions.append(version)
                    if tok in self.eos:
                        row.finish_reason = "stop"
                        break
                if not row.finish_reason and len(row.token_ids) >= max_tokens:
                    row.finish_reason = "length"
                if row.finish_reason:
                    row.version_end = version
                else:
                    still.append(i)
            active = still
        return rows

    @torch.no_grad()
    def _step(self, prefixes: list[list[int]], budget: int) -> tuple[list[list[int]], list[list[float]]]:
        """Up to `budget` new tokens for each prefix (left-padded into one batch)."""
        cfg = self.cfg
        width = max(map(len, prefixes))
        ids = torch.full((len(prefixes), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prefixes):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        sample = cfg.temperature > 0
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=budget,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=cfg.top_k if sample else None,  # 0 disables (HF's own default would be 50)
            pad_token_id=self.pad,
            eos_token_id=sorted(self.eos) or None,
            output_scores=True,
            return_dict_in_generate=True,
            generation_config=self.generation_config,
        )
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B, T, V), processed
        lps = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return new.tolist(), lps.tolist()

    async def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, secret: str, bind: str
    ) -> None:
        if self.group is not None:
            self.group.close()  # a new group replaces the old one (and its shared region)
        self.group = await asyncio.to_thread(
            wb.open_group, host, port, rank_offset, world_size, backend, secret, bind=bind
        )

    async def receive_weights(self, plan_wire: list, version: int) -> int:
        if self.group is None:
            raise RuntimeError("init_weight_group must run before weights can be received")
        plan = wb.plan_from_wire(plan_wire)
        group = self.group

        def receive_all():
            return [pair for bucket in wb.receive(group, plan, self.device) for pair in bucket]

        async with self._swap():
            named = await asyncio.to_thread(receive_all)
            self._load(named, version)
        return sum(wb.bucket_bytes_of(b) for b in plan)

    async def load_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        async with self._swap():
            self._load(named, version)

    def _load(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        if is_adapter(n for n, _ in named):  # learner.lora: merged here, from the base weights kept once
            self._merger = self._merger or AdapterMerger(self.model)
            self._merger.load(named)
            self.version = version
            return
        params = dict(self.model.named_parameters())
        missing = set(params) - {n for n, _ in named}
        if missing:
            raise ValueError(f"weight update lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor)
        self.version = version

    def _swap(self):
        return _Swap(self)

    async def weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in (names or params)}

    async def shutdown(self) -> None:
        self.model = None


class _Swap:
    """Exclusive access to the model for a weight swap (see the module docstring)."""

    def __init__(self, engine: TransformersEngine):
        self.engine = engine

    async def __aenter__(self):
        e = self.engine
        if not e.cfg.partial_rollout:
            async with e._idle:
                e._updating = True
                await e._idle.wait_for(lambda: e._in_flight == 0)
        await e._model_lock.acquire()

    async def __aexit__(self, exc_type, exc, tb):
        e = self.engine
        e._model_lock.release()
        async with e._idle:
            e._updating = False
            e._idle.notify_all()


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]
