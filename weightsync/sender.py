"""The learner's side of the weight sync: rank 0 hosts the group and broadcasts its weights.

The protocol both sides share (bucket plan, wire format, authenticated group formation) is
`weightsync.transport`; the engines' side is `weightsync.receiver` and `rollout.hf_engine`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from runtime.rendezvous import StoreServer
from weightsync.transport import (  # noqa: F401 (TensorSpec: re-exported for the learner)
    DEFAULT_BUCKET_BYTES,
    Bucket,
    TensorSpec,
    WeightGroup,
    backend_for,
    node_ip,
    open_group,
    pack,
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
    order. Under ZeRO-3 pass an iterator that gathers one parameter at a time: nothing here
    holds more than two buckets.
    """

    def __init__(
        self,
        num_receivers: int,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | None = None,
        host: str | None = None,
        port: int = 0,
        timeout_s: float = 600.0,
    ):
        self.world_size = num_receivers + 1
        self.bucket_bytes = bucket_bytes
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = backend_for(self.device)
        self.secret = secrets.token_hex(32)  # one per group: a member of an earlier group cannot join this one
        self.server = StoreServer(host or node_ip(), bytes.fromhex(self.secret), name="weight group", port=port)
        self.host, self.port = self.server.address
        self.timeout_s = timeout_s
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
        self.group = open_group(self.host, self.port, 0, self.world_size, self.backend, self.secret, self.timeout_s)

    def plan(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[Bucket]:
        return plan_buckets((spec_of(n, t) for n, t in named_tensors), self.bucket_bytes)

    def broadcast(self, named_tensors: Iterable[tuple[str, torch.Tensor]], plan: list[Bucket]) -> BroadcastStats:
        """Send the tensors the plan names, in plan order (names and shapes are checked)."""
        if self.group is None:
            raise RuntimeError("connect() the weight group before broadcasting")
        start = time.perf_counter()
        tensors = iter(named_tensors)
        pending = None
        total = 0
        for bucket in plan:
            parts = []
            for spec in bucket:
                name, tensor = next(tensors)
                if spec_of(name, tensor) != spec:
                    raise ValueError(f"broadcast got {spec_of(name, tensor)} where the plan has {spec}")
                parts.append(tensor)
            buffer = pack(parts, self.device)
            if pending is not None:
                pending[0].wait()  # keep at most two buckets alive
            pending = (self.group.broadcast(buffer), buffer)
            total += buffer.numel()
        if pending is not None:
            pending[0].wait()
        return BroadcastStats(total, time.perf_counter() - start, len(plan))

    def close(self) -> None:
        self.group = None
        self.server.close()
