"""Sending the learner's weights to running rollout engines, in buckets, over a process group.

The learner is rank 0 of a small group of its own; every engine worker (one per tensor-
parallel shard of every engine) is a receiver. The group is separate from DeepSpeed's and
vLLM's own groups, so it is built from a TCPStore and a backend object directly instead of
`init_process_group` (which owns the process-wide default group). gloo on CPU, NCCL on CUDA:
the same code.

Nobody else joins: rank 0 hosts the group's rendezvous on an authenticated store
(learner.rendezvous) bound to one address (loopback when the whole run is on one machine), and
every member proves a secret made for this group, handed to the engines through Ray, before any
address is exchanged. A process that merely reaches the port is refused and named in the log.

Wire format: a *plan* (the bucket layout, plain lists, sent to the receivers beside the call
that makes them listen) and then one broadcast per bucket, each a flat uint8 buffer holding
several tensors back to back. Few large broadcasts beat one per tensor (latency per call), and
a byte buffer mixes dtypes freely. One bucket is packed while the previous one is in flight.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from learner.rendezvous import AuthStore, StoreServer, gloo_options

DEFAULT_BUCKET_BYTES = 64 << 20
_STORE_PREFIX = "vespo-weights"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.torch_dtype.itemsize


Bucket = list[TensorSpec]


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Consecutive tensors grouped into buckets of at most bucket_bytes (a larger tensor goes alone)."""
    buckets: list[Bucket] = []
    size = 0
    for spec in specs:
        if not buckets or (size + spec.nbytes > bucket_bytes and buckets[-1]):
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += spec.nbytes
    return buckets


def plan_to_wire(plan: list[Bucket]) -> list[list[list]]:
    """The plan as plain lists: it travels through Ray and vLLM's RPC, which both take these."""
    return [[[s.name, s.dtype, list(s.shape)] for s in bucket] for bucket in plan]


def plan_from_wire(wire: list[list[list]]) -> list[Bucket]:
    return [[TensorSpec(name, dtype, tuple(shape)) for name, dtype, shape in bucket] for bucket in wire]


def bucket_bytes_of(bucket: Bucket) -> int:
    return sum(s.nbytes for s in bucket)


def pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Tensors concatenated as raw bytes on device."""
    flat = [t.detach().to(device).contiguous().view(-1).view(torch.uint8) for t in tensors]
    return torch.cat(flat) if len(flat) > 1 else flat[0]


def unpack(buffer: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into buffer, in plan order."""
    out, offset = [], 0
    for spec in bucket:
        chunk = buffer[offset : offset + spec.nbytes]
        out.append((spec.name, chunk.view(spec.torch_dtype).view(spec.shape)))
        offset += spec.nbytes
    return out


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class WeightGroup:
    """A joined weight group. It keeps the store: rank 0 serves it for as long as the group lives."""

    backend: dist.Backend
    store: dist.Store

    def broadcast(self, buffer: torch.Tensor):
        """Broadcast from rank 0 into buffer on every rank; returns the pending work."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.backend.broadcast([buffer], opts)


def open_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    secret: str,
    timeout_s: float = 600.0,
    bind: str | None = None,
) -> WeightGroup:
    """Join the weight group whose store rank 0 hosts at host:port, proving `secret` (hex);
    blocks until every rank has joined. `bind`: this member's own address for gloo's sockets
    (default: host, right for rank 0 and for a run on one machine)."""
    timeout = timedelta(seconds=timeout_s)
    store = AuthStore(host, port, bytes.fromhex(secret), timeout, name="weight group")
    prefixed = dist.PrefixStore(_STORE_PREFIX, store)
    if backend == "gloo":
        group: dist.Backend = dist.ProcessGroupGloo(prefixed, rank, world_size, gloo_options(bind or host, timeout))
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")
    return WeightGroup(group, store)


def receive(group: WeightGroup, plan: list[Bucket], device: torch.device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receiver side: yields each bucket's (name, tensor) list as it lands. The next bucket's
    receive is posted before the current one is handed out, so loading overlaps the transfer."""
    pending = None
    for bucket in plan:
        buffer = torch.empty(bucket_bytes_of(bucket), dtype=torch.uint8, device=device)
        work = group.broadcast(buffer)
        if pending is not None:
            yield _landed(*pending)
        pending = (work, buffer, bucket)
    if pending is not None:
        yield _landed(*pending)


def _landed(work, buffer: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    work.wait()
    return unpack(buffer, bucket)


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


def node_ip() -> str:
    """The address Ray uses for this node; loopback outside Ray. Stores bind to it, never to
    all interfaces."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
