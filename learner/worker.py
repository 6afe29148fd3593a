"""One DeepSpeed data-parallel rank: model, optimizer, the training step, full weights out.

A plain class so it can run in-process (world size 1, tests) or inside a Ray actor
(learner.group). The device decides the backend: CUDA and NCCL where a GPU is visible,
CPU (DS_ACCELERATOR=cpu) and gloo otherwise.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import torch

from learner import lora
from learner.batching import TrainBatch
from learner.checkpoint import adapter
from learner.checkpoint.deepspeed_state import WeightsOnlyCheckpointEngine, load_rng, save_rng
from learner.checkpoint.reader import ADAPTER_DIR, DEEPSPEED_TAG, CheckpointError
from learner.config import LearnerConfig
from learner.deepspeed_config import deepspeed_config
from learner.divergence_metrics import LagKL, staleness_metrics
from learner.logprobs import token_logprobs
from learner.objectives import compute_loss, make_config
from learner.packing import PackedRows, micro_batches_of, packed_token_logprobs
from learner.process_group import host_store, join_default_group
from learner.routing_replay import RoutingStats, replay_routing, routing_shape
from learner.step_result import StepResult
from weightsync.transport import backend_for


class LearnerWorker:
    def __init__(
        self, cfg: LearnerConfig, rank: int = 0, store: tuple[str, int] | None = None, secret: str | None = None
    ):
        """`store`: the address of the group's authenticated rendezvous (rank 0 hosts it, see
        learner.group) and `secret` (hex) the proof every rank gives it. Without them (a single
        in-process rank) this rank hosts its own on loopback."""
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_rank = rank % max(torch.cuda.device_count(), 1) if cuda else 0
        backend = backend_for(torch.device("cuda", local_rank) if cuda else "cpu")  # the device DeepSpeed trains on
        if store is None:
            if cfg.world_size != 1:
                raise ValueError("a learner of several ranks needs the rendezvous store's address and secret")
            self._store_server = host_store("127.0.0.1", secrets.token_hex(32))
            store, secret = self._store_server.address, self._store_server.secret_hex
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(cfg.world_size),
            MASTER_ADDR=store[0],
            MASTER_PORT=str(store[1]),
        )
        import deepspeed

        self.cfg, self.rank = cfg, rank
        join_default_group(store, secret, rank, cfg.world_size, backend)
        deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=cfg.world_size, verbose=False)
        self._build(cfg)

    def rebuild(self, cfg: LearnerConfig) -> None:
        """Start over from the model at cfg.model_path with a fresh optimizer, objective and
        seed, keeping the process group and the weight group: a sweep runs many short
        trainings on one set of actors instead of paying their start-up each time."""
        if (cfg.world_size, cfg.zero_stage) != (self.cfg.world_size, self.cfg.zero_stage):
            raise ValueError("rebuild keeps the process group: world_size and zero_stage must not change")
        self.engine.destroy()
        self.cfg = cfg
        self._build(cfg)

    def _build(self, cfg: LearnerConfig) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.objective_config = make_config(cfg.objective, cfg.objective_config)
        torch.manual_seed(cfg.seed)
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype), cfg.lora)
        optimizer = torch.optim.AdamW(
            lora.trainable(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        warmup = cfg.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
        )
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(self.engine._config)
        self._stage0_grad_norm: float | None = None
        if cfg.zero_stage == 0:
            # Without ZeRO, DeepSpeed clips but does not keep the norm: record it on the way.
            self.engine.clip_fp32_gradients = self._clip_and_record_norm
        self.device = self.engine.device
        self.moe = routing_shape(model)  # (MoE layers, top_k, experts), or None for a dense model
        self.step_count = 0

    def train_step(self, batch: TrainBatch, totals: dict[str, float]) -> StepResult:
        """One optimizer step on this rank's shard; `totals` are the global token and sequence
        counts, so every micro-batch's loss is weighted to make the sum over all micro-batches
        and ranks exactly the objective's aggregate over the whole batch."""
        start = time.perf_counter()
        self.engine.train()
        result = self._forward_backward(batch, totals, backward=True)
        metrics = result.metrics
        t_step = time.perf_counter()
        skipped = self._drop_nonfinite_grads()
        self.engine.step()
        if self.cfg.zero_stage:
            skipped = not getattr(self.engine, "_step_applied", True)
        metrics["actor/step_skipped"] = float(skipped)
        metrics["perf/optimizer_s"] = time.perf_counter() - t_step
        self.step_count += 1
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm() if self.cfg.zero_stage else self._stage0_grad_norm
        if grad_norm is not None:
            metrics["actor/grad_norm"] = float(grad_norm)
        metrics["actor/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["perf/train_tokens_per_s"] = float(batch.attention_mask.sum()) / max(elapsed, 1e-9)
        metrics["perf/train_step_s"] = elapsed
        return result

    def _drop_nonfinite_grads(self) -> bool:
        """A NaN/inf gradient must never reach the weights. Under ZeRO 1-3 DeepSpeed checks the
        global grad norm (all-reduced, so every rank agrees) and skips the step itself. Without
        ZeRO the ranks agree here (one all-reduce of a flag), and dropping the gradients makes
        AdamW skip every parameter: no weight or moment changes on any rank."""
        if self.cfg.zero_stage:
            return False
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        bad = torch.tensor([0.0 if all(torch.isfinite(p.grad).all() for p in params) else 1.0], device=self.device)
        if self.cfg.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return False
        for p in params:
            p.grad = None
        return True

    @torch.no_grad()
    def evaluate_loss(self, batch: TrainBatch, totals: dict[str, float]) -> StepResult:
        """The objective on a batch without updating anything (for tests and monitoring)."""
        self.engine.eval()
        return self._forward_backward(batch, totals, backward=False)

    def _forward_backward(self, batch: TrainBatch, totals: dict[str, float], backward: bool) -> StepResult:
        sums: dict[str, float] = {}
        extremes: dict[str, float] = {}
        weight_total, computed = 0.0, 0
        clock = {"perf/forward_s": 0.0, "perf/objective_s": 0.0, "perf/backward_s": 0.0}
        lag_kl = LagKL()  # KL(sampler || current policy) by lag, against the sampler's own log-probs
        routing = RoutingStats.empty(self.moe) if self.moe else None  # the learner's routing against the engine's
        for _, micro, packed in self._micro_batches(batch, backward):
            t0 = time.perf_counter()
            logprobs, entropy = self._logprobs(micro, packed, with_entropy=True, routing=routing)
            computed += micro.input_ids.numel() if packed is None else packed.computed_tokens
            t1 = time.perf_counter()
            mask = micro.response_mask.to(self.device)
            behavior, is_weights = micro.behavior_logprobs.to(self.device), None
            lag_kl.add(logprobs, behavior, mask, self.step_count - micro.token_versions.to(self.device))
            if micro.old_logprobs is not None:
                # Mismatch correction: ratios against the learner's own pi_old, and
                # rho = pi_old / pi_sampler per token carries the engine's discrepancy.
                old = micro.old_logprobs.to(self.device)
                is_weights = torch.exp((old - behavior).clamp(-20.0, 20.0)) * mask + (1 - mask)
                behavior = old
            loss, metrics = compute_loss(
                self.cfg.objective,
                logprobs,
                behavior,
                micro.advantages.to(self.device),
                mask,
                self.objective_config,
                rollout_is_weights=is_weights,
            )
            share = self._share(micro, totals)
            t2 = time.perf_counter()
            if backward:
                self.engine.backward(loss * share * self.cfg.world_size, scale_wrt_gas=False)
            # Host-side times: on GPU they include waits for queued kernels (metrics sync each step).
            clock["perf/forward_s"] += t1 - t0
            clock["perf/objective_s"] += t2 - t1
            clock["perf/backward_s"] += time.perf_counter() - t2
            weight = float(micro.response_mask.sum())
            weight_total += weight
            for k, v in metrics.items():
                if k.endswith(("_max", "_min")):  # extremes over micro-batches, not their mean
                    pick = max if k.endswith("_max") else min
                    extremes[k] = pick(extremes.get(k, v), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * weight
            sums["loss_share"] = sums.get("loss_share", 0.0) + float(loss.detach()) * share
            sums["actor/entropy"] = sums.get("actor/entropy", 0.0) + float((entropy * mask).sum())
        out = {k: v / max(weight_total, 1.0) for k, v in sums.items() if k != "loss_share"}
        out.update(extremes)
        out["actor/loss"] = sums.get("loss_share", 0.0)  # this rank's part of the batch loss
        out.update(clock)
        out["perf/padding_frac"] = 1.0 - float(batch.attention_mask.sum()) / max(computed, 1)
        out.update(staleness_metrics(batch.token_versions, self.step_count))
        out.update(routing.metrics() if routing is not None else {})
        return StepResult(out, *lag_kl.by_lag())

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """pi_old: the current policy's log-probs of every token, (B, L-1), micro-batched."""
        self.engine.eval()
        out = torch.zeros_like(batch.behavior_logprobs)
        for rows, micro, packed in self._micro_batches(batch, backward=False):
            lp, _ = self._logprobs(micro, packed, with_entropy=False)
            out[torch.tensor(rows).unsqueeze(-1), torch.arange(lp.shape[1])] = lp.float().cpu()
        return out

    def _micro_batches(self, batch: TrainBatch, backward: bool):
        """This rank's micro-batches (learner.packing.micro_batches_of). Under ZeRO 2 and 3 each
        forward/backward holds collectives (gradient reduce-scatters, parameter gathers) and
        ranks cut their shards independently: a rank with fewer micro-batches than another
        then runs forwards (and backwards) of two tokens with zero loss, which take part in
        the collectives and add nothing to any gradient."""
        parts = list(micro_batches_of(batch, self.cfg.micro_batch_tokens, self.cfg.pack_sequences))
        count = torch.tensor([len(parts)], device=self.device)
        if self.cfg.world_size > 1 and self.cfg.zero_stage >= 2:
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        yield from parts
        for _ in range(int(count.item()) - len(parts)):
            ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
            lp = token_logprobs(self.engine, ids, torch.ones_like(ids))
            if backward:
                self.engine.backward(lp.sum() * 0.0, scale_wrt_gas=False)

    def _logprobs(self, micro: TrainBatch, packed: PackedRows | None, with_entropy: bool,
                  routing: RoutingStats | None = None) -> tuple:  # fmt: skip
        """(rows, L-1) log-probs of a micro-batch in its padded layout, computed packed or padded,
        and the entropy at each position (for `actor/entropy`) or None. An MoE model runs on the
        engine's experts (learner.routing_replay rollout) or its own, observed into `routing`."""
        temp, ids, attn = self.cfg.policy_temperature, micro.input_ids.to(self.device), micro.attention_mask
        routed = (packed.routed_experts if packed is not None else micro.routed_experts) if self.moe else None
        replay = self.cfg.routing_replay == "rollout"
        with replay_routing(self.engine.module, None if routed is None else routed.to(self.device), replay, routing):
            if packed is not None:
                out = packed_token_logprobs(self.engine, packed.to(self.device), temp, with_entropy)
            else:
                out = token_logprobs(self.engine, ids, attn.to(self.device), temp, with_entropy=with_entropy)
        return out if with_entropy else (out, None)

    def _share(self, micro: TrainBatch, totals: dict[str, float]) -> float:
        """This micro-batch's weight in the whole batch's aggregate (see row weights in
        learner.objectives.aggregation): its share of tokens for token-mean, of sequences otherwise."""
        if self.objective_config.agg == "token-mean":
            return float(micro.response_mask.sum()) / max(totals["tokens"], 1.0)
        return float((micro.response_mask.sum(-1) > 0).sum()) / max(totals["sequences"], 1.0)

    def _clip_and_record_norm(self) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_

        norm = clip_grad_norm_(self.engine.module.parameters(), self.cfg.grad_clip, mpu=self.engine.mpu)
        self._stage0_grad_norm = float(norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) weights on CPU by the base model's names (LoRA merged in);
        collective under ZeRO-3, so call it on every rank. It holds the whole model at once (and
        its caller receives it): for checks on small models only. Exports and checkpoints use
        export_model, which streams shard by shard."""
        module = self.engine.module
        state = lora.base_view(module, lora.base_module(module).state_dict(keep_vars=True).items())
        return {k: v.to("cpu", copy=True) for k, v in lora.gathered(module, state)}

    def export_model(self, out_dir: str, shard_bytes: int) -> int:
        """Write the full weights as a Hugging Face model directory (learner.export), shard by
        shard; returns the bytes of weight files written (0 on ranks other than 0). Collective
        under ZeRO-3: call it on every rank. Each tensor is gathered alone and released once
        copied, so no rank holds more than one shard of copies plus one gathered parameter."""
        from learner.export import write_hf_streaming
        from weightsync.transport import TensorSpec

        entries = self._export_entries()
        named = self._gathered(entries)
        if self.rank != 0:
            for _ in named:  # take part in the gathers
                pass
            return 0
        specs = [
            TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(getattr(t, "ds_shape", t.shape)))
            for n, t in entries
        ]
        try:
            files = write_hf_streaming(named, specs, self.cfg.model_path, out_dir, shard_bytes)
        except BaseException:
            for _ in named:  # the other ranks wait in the remaining gathers: let them finish
                pass
            raise
        return sum(f.stat().st_size for f in files if f.suffix == ".safetensors")

    def _export_entries(self) -> list[tuple[str, torch.Tensor]]:
        """What `save_pretrained` writes: the module's state_dict keys (parameters and persistent
        buffers) in their order, each tensor once. Of names sharing one tensor (tied weights)
        those the model declares tied (`_tied_weights_keys`, e.g. lm_head.weight) are dropped,
        so from_pretrained finds the source weight and ties the rest to it again."""
        import re

        module = lora.base_module(self.engine.module)  # under LoRA: base names, adapters merged in (_gathered)
        state = dict(lora.base_view(self.engine.module, module.state_dict(keep_vars=True).items()))  # not copies
        for key in getattr(module, "_keys_to_ignore_on_save", None) or ():
            state.pop(key, None)
        shared: dict[int, list[str]] = {}
        for name, tensor in state.items():
            shared.setdefault(id(tensor), []).append(name)
        tied_patterns = [
            f"{prefix}.{key}" if prefix else key
            for prefix, sub in module.named_modules()
            for key in (getattr(sub, "_tied_weights_keys", None) or ())
        ]
        drop: set[str] = set()
        for names in shared.values():
            if len(names) < 2:
                continue
            tied = [n for n in names if any(re.search(p, n) for p in tied_patterns)]
            keep = next((n for n in names if n not in tied), names[0])
            drop.update(n for n in names if n != keep)
        return [(n, t) for n, t in state.items() if n not in drop]

    def _gathered(self, entries: list[tuple[str, torch.Tensor]]):
        """(name, full tensor) for each entry, gathering ZeRO-3 parameters one at a time (a LoRA
        target merged with its adapter); a yielded tensor is valid until the next one is asked for."""
        return lora.gathered(self.engine.module, entries)

    def save_checkpoint(self, staged_dir: str) -> None:
        """Write this rank's part of a checkpoint into the staging directory (see learner.checkpoint);
        under LoRA the adapter, not the frozen base (learner.checkpoint.adapter)."""
        path, state = Path(staged_dir), {"step": self.step_count}
        with adapter.adapter_only_state(self.engine) as options:  # {} for a plain model
            self.engine.save_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, client_state=state,
                                        save_latest=False, **options)  # fmt: skip
        if lora.is_wrapped(self.engine.module):  # collective under ZeRO-3
            adapter.save_adapter(self.engine.module, path / ADAPTER_DIR, self.cfg.model_path, self.rank == 0)
        save_rng(path, self.rank)

    def load_checkpoint(self, checkpoint_dir: str) -> int:
        path = Path(checkpoint_dir)
        options = adapter.load_options(path, self.engine.module)  # LoRA: the adapter; the base is cfg.model_path's
        _, client_state = self.engine.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, **options)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed found no state to load in {path / 'deepspeed'}")
        self.step_count = int(client_state["step"])
        load_rng(path, self.rank)
        return self.step_count

    # --- weight broadcast to the rollout engines (weightsync.sender) -------------------

    def open_weight_sync(self, num_receivers: int, bucket_bytes: int, host: str | None = None) -> tuple[str, int, str]:
        """Rank 0 hosts the weight group's store on `host` (default: this node's Ray address);
        returns the address receivers join and the secret (hex) they must prove."""
        from weightsync.sender import WeightBroadcaster

        if getattr(self, "broadcaster", None) is not None:
            self.broadcaster.close()  # the old group and its shared region go
        self.broadcaster = WeightBroadcaster(num_receivers, bucket_bytes=bucket_bytes, device=self.device, host=host,
                                             same_node=self.cfg.weight_sync_shm)  # fmt: skip
        return *self.broadcaster.address, self.broadcaster.secret

    def weight_sync_refused(self) -> tuple[int, list[str]]:
        """Who tried to join the weight group without the secret: how many, and the latest."""
        broadcaster = getattr(self, "broadcaster", None)
        return broadcaster.refused if broadcaster is not None else (0, [])

    def connect_weight_sync(self) -> None:
        self.broadcaster.connect()

    def weight_plan(self) -> list:
        """The bucket layout of what each sync sends (names, dtypes, unpartitioned shapes): the
        full weights, or the adapter alone under LoRA (learner.lora.sync_weights)."""
        from weightsync.transport import TensorSpec, plan_buckets, plan_to_wire

        specs = [TensorSpec(n, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
                 for n, p in lora.sync_weights(self.engine.module)]  # fmt: skip
        return plan_to_wire(plan_buckets(specs, self.broadcaster.bucket_bytes))

    def broadcast_weights(self, wire_plan: list) -> dict[str, float]:
        """Send the weights (the adapter under LoRA) to every receiver. Collective on all ranks under ZeRO-3 (each
        parameter is gathered in turn, so no rank ever holds the whole model at once); only
        rank 0 sends."""
        from weightsync.transport import plan_from_wire

        named = self._gathered_parameters()
        if self.rank != 0:
            for _ in named:  # take part in the gathers
                pass
            return {}
        stats = self.broadcaster.broadcast(named, plan_from_wire(wire_plan))
        return {"sync/bytes": float(stats.bytes), "sync/seconds": stats.seconds, "sync/bytes_per_s": stats.bytes_per_s}

    def _gathered_parameters(self):
        return lora.sync_gathered(self.engine.module, lora.sync_weights(self.engine.module))
