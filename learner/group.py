"""The learner as a group of Ray actors forming one DeepSpeed data-parallel job.

The driver sees one object: hand it a batch, get back merged metrics. It computes advantages
(learner.advantages, `learner.advantage`) over whole groups before sharding (advantages are group-relative), tells every
rank the global token and sequence counts (so the loss aggregates exactly across ranks and
micro-batches), and shards rows by length so ranks finish together.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch

from buffer.replay import Batch
from buffer.trajectory import Trajectory
from learner import checkpoint
from learner.advantages import advantages
from learner.batching import TrainBatch, collate
from learner.config import LearnerConfig
from learner.process_group import host_store
from learner.sharding import batch_totals, merge_results, shard, shard_rows
from learner.step_result import StepResult
from learner.worker import LearnerWorker
from runtime.cores import held_cores, pin_process

log = logging.getLogger(__name__)


class _RankActor(LearnerWorker):
    """LearnerWorker whose distributed set-up waits until every rank's actor exists."""

    def __init__(self, cfg: LearnerConfig, rank: int):  # noqa: D107 - deferred on purpose
        self.cfg, self.rank = cfg, rank
        self.cores = pin_process(cfg.cpu_cores[rank]) if cfg.cpu_cores else held_cores()

    def host_rendezvous(self, secret: str, host: str | None) -> tuple[str, int]:
        """Rank 0: start the group's authenticated store on `host` (default: this node's Ray
        address); it lives as long as the actor."""
        self._store_server = host_store(host or ray.util.get_node_ip_address(), secret)
        return self._store_server.address

    def setup(self, store: tuple[str, int], secret: str) -> list[int]:
        """Join the group; returns the cores this rank runs on."""
        LearnerWorker.__init__(self, self.cfg, self.rank, tuple(store), secret)
        return self.cores

    def refused(self) -> tuple[int, list[str]]:
        """Connections to this rank's stores that did not prove their secret: how many, and
        the latest ones of each store."""
        server = getattr(self, "_store_server", None)
        total, latest = self.weight_sync_refused()
        if server is not None:
            total, latest = total + server.refused_total, [*server.refused, *latest]
        return total, latest


def loopback_if_one_node() -> str | None:
    """Where a run's stores listen: loopback when the Ray cluster is this one machine (nothing
    else needs to reach them), else None: the node's own address, never all interfaces."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "127.0.0.1" if len(alive) == 1 else None


class LearnerGroup:
    def __init__(
        self, cfg: LearnerConfig, node_resources: dict[str, float] | None = None, ready_timeout_s: float = 600
    ):
        """`node_resources`: extra custom resources every rank asks for (the learner node group's
        marker on a multi-node cluster). Ranks are one PACK placement group, so DeepSpeed gets as
        few nodes as possible, and a layout that cannot be placed fails here with the reason."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        bundle = {
            "CPU": cfg.num_cpus_per_worker,
            **({"GPU": cfg.num_gpus_per_worker} if cfg.num_gpus_per_worker else {}),
        }
        self.placement = placement_group([{**bundle, **(node_resources or {})}] * cfg.world_size, strategy="PACK")
        ready, _ = ray.wait([self.placement.ready()], timeout=ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.placement)
            raise RuntimeError(
                f"the learner's {cfg.world_size} rank(s) of {bundle} (+{node_resources or {}}) could not be placed "
                f"in {ready_timeout_s:.0f}s: the cluster lacks the resources (see `vespo plan`)"
            )
        actor = ray.remote(num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker)(_RankActor)
        env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if cfg.num_gpus_per_worker == 0 else {}
        self.workers = [
            actor.options(
                runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=r),
            ).remote(cfg, r)
            for r in range(cfg.world_size)
        ]
        # the secret travels to the ranks through Ray (token-authenticated on a cluster), nowhere else
        secret = secrets.token_hex(32)
        store = ray.get(self.workers[0].host_rendezvous.remote(secret, loopback_if_one_node()))
        log.info("learner group: rendezvous at %s:%d; ranks must prove the group's secret", *store)
        self.cores = ray.get([w.setup.remote(store, secret) for w in self.workers])

    def rebuild(self, cfg: LearnerConfig) -> None:
        """Every rank starts over from cfg (model, fresh optimizer, objective, seed); see
        LearnerWorker.rebuild. The weight group and the placement stay."""
        ray.get([w.rebuild.remote(cfg) for w in self.workers])
        self.cfg = cfg

    def make_batch(
        self, trajectories: list[Trajectory], pad_id: int = 0, weights: list[float] | None = None
    ) -> TrainBatch:
        """Group-relative advantages, each scaled by its trajectory's weight (the buffer's
        `downweight` policy: < 1 for groups staler than the cap). Every objective is positively
        homogeneous in the advantage, so a weight w scales exactly that sequence's contribution
        to the gradient by w (tests/test_downweight.py)."""
        rewards = np.array([t.reward for t in trajectories], dtype=np.float32)
        groups = [t.group_id for t in trajectories]
        adv = advantages(self.cfg.advantage, rewards, groups, self.cfg.normalize_adv_std)
        if weights is not None:
            if len(weights) != len(trajectories) or any(not w >= 0 for w in weights):
                raise ValueError(f"need one weight >= 0 per trajectory, got {len(weights)} for {len(trajectories)}")
            adv = adv * torch.as_tensor(weights, dtype=torch.float32)
        return collate(trajectories, adv.numpy(), pad_id)

    def train(self, batch: Batch, pad_id: int, recompute_old_logprobs: bool = False) -> StepResult:
        """One optimizer step on a buffer batch: advantages (scaled by the batch's weights), pi_old
        recomputed by the learner when asked (train/inference mismatch correction), the loss."""
        trained = self.make_batch(batch.trajectories, pad_id, batch.weights)
        if recompute_old_logprobs:
            trained = self.with_old_logprobs(trained)
        return self.train_step(trained)

    def train_step(self, batch: TrainBatch) -> StepResult:
        return self._on_shards("train_step", batch)

    def with_old_logprobs(self, batch: TrainBatch) -> TrainBatch:
        """The batch with pi_old recomputed by the learner (train/inference mismatch correction)."""
        shards = shard(batch, self.cfg.world_size)
        parts = ray.get([w.compute_logprobs.remote(s) for w, s in zip(self.workers, shards, strict=True)])
        old = torch.zeros_like(batch.behavior_logprobs)
        for rank, part in enumerate(parts):
            old[shard_rows(batch, self.cfg.world_size)[rank]] = part
        return TrainBatch(**{**{f: getattr(batch, f) for f in batch.__dataclass_fields__}, "old_logprobs": old})

    def evaluate_loss(self, batch: TrainBatch) -> StepResult:
        return self._on_shards("evaluate_loss", batch)

    def _on_shards(self, method: str, batch: TrainBatch) -> StepResult:
        totals = batch_totals(batch)
        shards = shard(batch, self.cfg.world_size)
        calls = [getattr(w, method).remote(s, totals) for w, s in zip(self.workers, shards, strict=True)]
        return merge_results(ray.get(calls))

    def full_state_dict(self) -> dict:
        """Full weights from rank 0 (every rank takes part in the gather under ZeRO-3). The whole
        model lands in the driver: for checks on small models only, never on the export or
        checkpoint path (use export_model)."""
        return ray.get([w.full_state_dict.remote() for w in self.workers])[0]

    def export_model(self, out_dir: str | Path, shard_bytes: int | None = None) -> None:
        """Write the full weights as a Hugging Face model directory at out_dir (a filesystem rank
        0 writes and the caller can read), in safetensors shards of at most shard_bytes
        (default learner.export.DEFAULT_SHARD_BYTES). Every rank takes part, one parameter at a
        time; rank 0 streams the shards to disk, and no tensor ever reaches the driver."""
        from learner.export import DEFAULT_SHARD_BYTES

        size = DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes
        ray.get([w.export_model.remote(str(out_dir), size) for w in self.workers])

    def save_checkpoint(
        self,
        root: str | Path,
        step: int,
        policy_version: int,
        extra: dict[str, Callable[[Path], None]] | None = None,
        keep: int = 0,
    ) -> Path:
        """Checkpoint every rank, the exported model and any extra state (e.g. {"buffer": snapshot}),
        atomically (see learner.checkpoint.finalize); then keep the newest `keep` (0: all).
        Ranks must share the filesystem under root (a network volume on clusters)."""
        staged = checkpoint.prepare_staging(root, step)
        ray.get([w.save_checkpoint.remote(str(staged)) for w in self.workers])
        if self.cfg.lora is None:  # a LoRA checkpoint holds its adapter (adapter/, by the ranks) instead
            self.export_model(staged / "model")  # rank 0 writes it shard by shard: no weights pass the driver
        for name, write in (extra or {}).items():
            write(staged / name)
        meta = checkpoint.CheckpointMeta(step, policy_version, self.cfg.world_size, self.cfg.zero_stage)
        return checkpoint.finalize(root, meta, keep=keep)

    def load_checkpoint(self, path: str | Path) -> checkpoint.CheckpointMeta:
        """Resume every rank from the newest complete checkpoint under path (or path itself)."""
        found = checkpoint.latest(path)
        meta = checkpoint.read_meta(found)
        if meta.world_size != self.cfg.world_size or meta.zero_stage != self.cfg.zero_stage:
            raise checkpoint.CheckpointError(
                f"{found} was written by {meta.world_size} rank(s) at ZeRO-{meta.zero_stage}; this learner has "
                f"{self.cfg.world_size} at ZeRO-{self.cfg.zero_stage}"
            )
        ray.get([w.load_checkpoint.remote(str(found)) for w in self.workers])
        return meta

    def open_weight_sync(self, num_receivers: int, bucket_bytes: int = 64 << 20) -> tuple[str, int, str]:
        """Start hosting the weight group on rank 0; receivers join the returned address as
        ranks 1..num_receivers with the returned secret, then call connect_weight_sync() (it
        waits for them)."""
        host = loopback_if_one_node()
        return tuple(ray.get(self.workers[0].open_weight_sync.remote(num_receivers, bucket_bytes, host)))

    def refused(self) -> tuple[int, list[str]]:
        """Connections to the learner's stores (its own group's, the weight group's) that did
        not prove the secret: how many in all, and the latest as "ip:port (why)"."""
        return tuple(ray.get(self.workers[0].refused.remote()))

    def connect_weight_sync(self):
        """An ObjectRef that completes when every receiver has joined."""
        return self.workers[0].connect_weight_sync.remote()

    def weight_plan(self) -> list:
        return ray.get(self.workers[0].weight_plan.remote())

    def broadcast_weights(self, wire_plan: list) -> list:
        """ObjectRefs of one broadcast: start the receivers with the same plan, then ray.get these."""
        return [w.broadcast_weights.remote(wire_plan) for w in self.workers]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)
            self.placement = None
