"""The learner's side of the weight sync: rank 0 hosts the group and broadcasts its weights.

The protocol both sides share (bucket plan, wire format, authenticated group formation) is
`weightsync.transport`; the engines' side is `weightsync.receiver` and `rollout.hf_engine`.
Receivers on this node read the buckets from a region this process writes (`weightsync.shm`);
the rest get them by broadcast, straight from the same region when there is one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch

from runtime.rendezvous import StoreServer
from weightsync.transport import (  # noqa: F401 (TensorSpec: re-exported for the learner)
    DEFAULT_BUCKET_BYTES,
    Bucket,
    TensorSpec,
    WeightGroup,
    backend_for,
    bucket_bytes_of,
    node_ip,
    open_group,
    pack,
    pack_into,
    plan_buckets,
    spec_of,
)  # fmt: skip


@dataclass
class BroadcastStats:
    bytes: int
    seconds: float
    buckets: int

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9)


class WeightBroadcaster:
    """Rank 0 of the weight group, on the learner.

    Usage: create it (it starts the group's store on `host`), start every receiver's join
    (rollout actors' `init_weight_group` with `address`, their rank offset, `world_size` and
    `secret`), call `connect()`; then per update make a
    plan, start the receivers with it and call `broadcast` with the same tensors in the same
    order. Under ZeRO-3 pass an iterator that gathers one parameter at a time: the broadcast
    holds at most two buckets; receivers on this node share one region the size of the update.
    """

    def __init__(
        self,
        num_receivers: int,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | None = None,
        host: str | None = None,
        port: int = 0,
        timeout_s: float = 600.0,
        same_node: bool | Collection[int] = True,
    ):
        self.world_size = num_receivers + 1
        self.bucket_bytes = bucket_bytes
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = backend_for(self.device)
        self.secret = secrets.token_hex(32)  # one per group: a member of an earlier group cannot join this one
        self.server = StoreServer(host or node_ip(), bytes.fromhex(self.secret), name="weight group", port=port)
        self.host, self.port = self.server.address
        self.timeout_s = timeout_s
        self.same_node = same_node  # shared memory for receivers on this node (transport.open_group)
        self.group: WeightGroup | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def refused(self) -> tuple[int, list[str]]:
        """Connections to the group's store that did not prove the secret: how many, and the
        latest as "ip:port (why)"."""
        return self.server.refused_total, list(self.server.refused)

    def connect(self) -> None:
        self.group = open_group(self.host, self.port, 0, self.world_size, self.backend, self.secret, self.timeout_s,
                                same_node=self.same_node)  # fmt: skip

    def plan(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[Bucket]:
        return plan_buckets((spec_of(n, t) for n, t in named_tensors), self.bucket_bytes)

    def broadcast(self, named_tensors: Iterable[tuple[str, torch.Tensor]], plan: list[Bucket]) -> BroadcastStats:
        """Send the tensors the plan names, in plan order (names and shapes are checked)."""
        if self.group is None:
            raise RuntimeError("connect() the weight group before broadcasting")
        start = time.perf_counter()
        tensors = iter(named_tensors)
        local = self.group.local
        slots = local.begin([bucket_bytes_of(b) for b in plan]) if local is not None else None
        sent, signals = [], []  # broadcasts and signals in flight
        total = 0
        for k, bucket in enumerate(plan):
            parts = []
            for spec in bucket:
                name, tensor = next(tensors)
                if spec_of(name, tensor) != spec:
                    raise ValueError(f"broadcast got {spec_of(name, tensor)} where the plan has {spec}")
                parts.append(tensor)
            if slots is not None:
                buffer = pack_into(parts, slots[k])  # the region is not reused within an update
                signals.append(local.ready(k))
            else:
                buffer = pack(parts, self.device)
                if sent:
                    sent.pop(0)[0].wait()  # keep at most two buckets alive
            if self.group.remote is not None:
                sent.append((self.group.broadcast(buffer), buffer))
            total += buffer.numel()
        for work, _ in sent:
            work.wait()
        for work in signals:
            work.wait()
        return BroadcastStats(total, time.perf_counter() - start, len(plan))

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None
        self.server.close()
