"""The weight-sync transport: how the learner's weights reach running rollout engines.

The learner is rank 0 of a small group of its own; every engine worker (one per tensor-
parallel shard of every engine) is a receiver. The group is separate from DeepSpeed's and
vLLM's own groups, so it is built from a TCPStore and a backend object directly instead of
`init_process_group` (which owns the process-wide default group). gloo on CPU, NCCL on CUDA:
the same code.

Nobody else joins: rank 0 hosts the group's rendezvous on an authenticated store
(runtime.rendezvous) bound to one address (loopback when the whole run is on one machine), and
every member proves a secret made for this group, handed to the engines through Ray, before any
address is exchanged. A process that merely reaches the port is refused and named in the log.

Receivers on rank 0's node that can map its memory take the buckets from there instead
(`weightsync.shm`: /dev/shm on CPU, CUDA IPC on GPUs); the broadcast then only reaches the
others. Which receivers are local is agreed when the group forms.

Wire format: a *plan* (the bucket layout, plain lists, sent to the receivers beside the call
that makes them listen) and then one broadcast per bucket, each a flat uint8 buffer holding
several tensors back to back. Few large broadcasts beat one per tensor (latency per call), and
a byte buffer mixes dtypes freely. One bucket is packed while the previous one is in flight.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.rendezvous import AuthStore, gloo_options
from weightsync.shm import SameNode, local_ranks

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


def pack_into(tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """pack() into a given uint8 buffer of exactly their size (rank 0's shared region)."""
    offset = 0
    for t in tensors:
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        out[offset : offset + flat.numel()].copy_(flat)
        offset += flat.numel()
    if offset != out.numel():
        raise ValueError(f"packed {offset} bytes into a {out.numel()}-byte buffer")
    return out


def unpack(buffer: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into buffer, in plan order."""
    out, offset = [], 0
    for spec in bucket:
        chunk = buffer[offset : offset + spec.nbytes]
        out.append((spec.name, chunk.view(spec.torch_dtype).view(spec.shape)))
        offset += spec.nbytes
    return out


def backend_for(device: torch.device | str) -> str:
    """The one rule for every process group of a run: NCCL between CUDA devices, else gloo."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class WeightGroup:
    """A joined weight group. It keeps the store: rank 0 serves it for as long as the group lives.
    `remote`: the broadcast to the receivers not on rank 0's node (None on a local receiver, or
    on rank 0 when every receiver is local); `local`: rank 0's node's shared region (None on a
    remote receiver, or on rank 0 when none is local)."""

    store: dist.Store
    remote: dist.Backend | None = None
    local: SameNode | None = None

    def broadcast(self, buffer: torch.Tensor):
        """Broadcast from rank 0 into buffer on every remote member; returns the pending work."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.remote.broadcast([buffer], opts)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        self.local = self.remote = None


def device_for(backend: str) -> torch.device:
    """Where rank 0's buckets live: this process's current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def open_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    secret: str,
    timeout_s: float = 600.0,
    bind: str | None = None,
    same_node: bool | Collection[int] = True,
) -> WeightGroup:
    """Join the weight group whose store rank 0 hosts at host:port, proving `secret` (hex);
    blocks until every rank has joined. `bind`: this member's own address for gloo's sockets
    (default: host, right for rank 0 and for a run on one machine). `same_node`: whether
    receivers on rank 0's node take the weights from shared memory (`weightsync.shm.local_ranks`;
    rank 0's value decides, a receiver can only opt out)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    store = AuthStore(host, port, bytes.fromhex(secret), timeout, name="weight group")
    local = local_ranks(store, rank, world_size, device_for(backend), same_node)
    remote = [r for r in range(world_size) if r not in local]  # rank 0 first
    group = WeightGroup(store)
    if (rank == 0 or rank in local) and local:
        members = [0, *local]
        signals = dist.ProcessGroupGloo(dist.PrefixStore(f"{_STORE_PREFIX}/local", store), members.index(rank),
                                        len(members), gloo_options(bind or host, timeout))  # fmt: skip
        group.local = SameNode(store, members.index(rank), signals, device_for(backend), timeout)
    if rank in remote and len(remote) > 1:
        prefixed = dist.PrefixStore(_STORE_PREFIX, store)
        sub = remote.index(rank)
        if backend == "gloo":
            group.remote = dist.ProcessGroupGloo(prefixed, sub, len(remote), gloo_options(bind or host, timeout))
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group.remote = dist.ProcessGroupNCCL(prefixed, sub, len(remote), options)
    return group


def receive(group: WeightGroup, plan: list[Bucket], device: torch.device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receiver side: yields each bucket's (name, tensor) list as it lands. From shared memory the
    tensors are views of rank 0's region (valid until the next update starts; moved to `device`
    if it differs). From the broadcast, the next bucket's receive is posted before the current one
    is handed out, so loading overlaps the transfer."""
    if group.local is not None:
        for buffer, bucket in zip(group.local.receive([bucket_bytes_of(b) for b in plan]), plan, strict=True):
            yield [(name, t if t.device == device else t.to(device)) for name, t in unpack(buffer, bucket)]
        return
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
