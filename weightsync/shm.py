"""Weights to the engines on the learner's own node through memory both sides map, not sockets.

Over loopback TCP a weight update costs several copies and the kernel's socket path per byte
(a small fraction of a memcpy). Receivers on rank 0's node instead map one region rank 0 writes
each bucket into: one copy on the learner, none on the engine, whose loader reads views of the
region. The group's small gloo collectives only order things: "every receiver is listening",
"bucket k is written". Receivers elsewhere keep the broadcast (`weightsync.transport`).

Which memory, by rank 0's device, one code path:
- CPU: a file in /dev/shm (tmpfs), mode 0600, a random 128-bit name. The name is handed out
  through the group's authenticated store, so only members that proved the group's secret learn
  it, and it is unlinked as soon as every local receiver has mapped it: a process that dies
  afterwards leaks nothing (the memory goes with the last mapping). Receivers map it read-only.
- CUDA: the same region as device memory shared by CUDA IPC (`_share_cuda_` / `_new_shared_cuda`,
  what torch.multiprocessing uses), the device found by UUID. Untested until a GPU run.

The region holds a whole update (each bucket at its own offset, sized by the plan), because
vLLM's layerwise reload keeps views of some loaded tensors until the end of `reload_weights`:
a region reused within one update would change weights under it. It is reused by the next
update once every receiver is back (the first collective of each update).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import socket
import warnings
from collections.abc import Collection, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
NAME_PREFIX = "vespo-weights-"
_NAME = re.compile(re.escape(NAME_PREFIX) + r"[0-9a-f]{32}")
_KEY = "vespo-weights-local"  # store keys of this module
_ALIGN = 64  # each bucket starts on a cache line
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in once, at mapping time


def node_id() -> str:
    """Hostname and boot id: two processes with the same one run on the same (booted) machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmRegion:
    """A region of /dev/shm: rank 0 maps it read-write, receivers read-only (an engine cannot
    change what the others read)."""

    def __init__(self, buffer: torch.Tensor, mm: mmap.mmap, path: str, owner: bool):
        self.buffer, self._mm, self.path, self._owner = buffer, mm, path, owner

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> ShmRegion:
        path = os.path.join(SHM_DIR, NAME_PREFIX + secrets.token_hex(16))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # a full /dev/shm fails here, not as SIGBUS on a write
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(torch.frombuffer(mm, dtype=torch.uint8), mm, path, owner=True)

    @property
    def handle(self) -> dict:
        return {"name": os.path.basename(self.path)}

    @classmethod
    def attach(cls, handle: dict, nbytes: int) -> ShmRegion:
        name = str(handle["name"])
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a weight region name: {name!r}")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError(f"{path} holds fewer than {nbytes} bytes")
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            return cls(torch.frombuffer(mm, dtype=torch.uint8), mm, path, owner=False)

    def written(self) -> None:
        """Stores to a shared mapping are visible to the other mappers as they happen."""

    def unlink(self) -> None:
        if self._owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        self.buffer = None
        try:
            self._mm.close()
        except BufferError:
            pass  # views still held somewhere: unmapped when the last one goes


class CudaIpcRegion:
    """Device memory of rank 0 mapped into the receivers' processes by CUDA IPC. Untested until a
    GPU run: written to the same interface as ShmRegion, from torch.multiprocessing's reductions."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> CudaIpcRegion:
        return cls(torch.empty(nbytes, dtype=torch.uint8, device=device))

    @property
    def handle(self) -> dict:
        dev, handle, size, offset, ref, ref_offset, event, event_sync = self.buffer.untyped_storage()._share_cuda_()
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
        event = event.hex() if event else None
        return {"uuid": uuid, "handle": handle.hex(), "size": size, "offset": offset, "ref": ref.hex(),
                "ref_offset": ref_offset, "event": event, "event_sync": event_sync}  # fmt: skip

    @classmethod
    def attach(cls, handle: dict, nbytes: int) -> CudaIpcRegion:
        """Device indices differ between processes (CUDA_VISIBLE_DEVICES): find rank 0's by UUID."""
        index = next((i for i in range(torch.cuda.device_count())
                      if str(torch.cuda.get_device_properties(i).uuid) == handle["uuid"]), None)  # fmt: skip
        if index is None:
            raise LookupError(f"GPU {handle['uuid']} is not visible to this process")
        event = bytes.fromhex(handle["event"]) if handle["event"] else None
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            index, bytes.fromhex(handle["handle"]), handle["size"], handle["offset"], bytes.fromhex(handle["ref"]),
            handle["ref_offset"], event, handle["event_sync"],
        )  # fmt: skip
        buffer = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
        return cls(buffer.set_(storage, 0, (nbytes,), (1,)))

    def written(self) -> None:
        """Copies into device memory are asynchronous: done before any receiver is told."""
        torch.cuda.current_stream(self.buffer.device).synchronize()

    def unlink(self) -> None:
        """Nothing is named: the memory lives while rank 0 holds it."""

    def close(self) -> None:
        self.buffer = None


def region_class(device: torch.device) -> type[ShmRegion] | type[CudaIpcRegion]:
    return CudaIpcRegion if device.type == "cuda" else ShmRegion


def local_ranks(
    store: dist.Store, rank: int, world_size: int, device: torch.device, same_node: bool | Collection[int]
) -> list[int]:
    """The receivers that will map rank 0's memory, agreed by every member at group formation.

    Rank 0 offers a small probe region (its node id, the region's handle, a random nonce); a
    receiver on the same node maps it and checks the nonce, so "local" means "can map rank 0's
    memory" (not just "same hostname"). Rank 0 then decides: `same_node` True lets every receiver
    that could map it, False none (all use the broadcast), a collection of ranks only those.
    A receiver passing False opts itself out.
    """
    region_cls = region_class(device)
    if rank == 0:
        probe, nonce = None, secrets.token_bytes(16)
        if same_node is not False and world_size > 1:
            try:
                probe = region_cls.create(4096, device)
            except (OSError, RuntimeError):
                pass  # no shared memory here (no /dev/shm): every receiver gets the broadcast
            else:
                probe.buffer[: len(nonce)].copy_(torch.frombuffer(bytearray(nonce), dtype=torch.uint8))
                probe.written()
        offer = {"node": node_id(), "handle": probe.handle, "nonce": nonce.hex()} if probe else {}
        store.set(f"{_KEY}/offer", json.dumps(offer))
        try:
            answers = [store.get(f"{_KEY}/answer/{r}") == b"1" for r in range(1, world_size)]
        finally:
            if probe is not None:
                probe.close()
        allowed = (lambda r: True) if same_node is True else (lambda r: bool(same_node) and r in same_node)
        local = [r for r, ok in enumerate(answers, start=1) if ok and allowed(r)]
        store.set(f"{_KEY}/ranks", json.dumps(local))
        return local
    offer = json.loads(store.get(f"{_KEY}/offer"))
    store.set(f"{_KEY}/answer/{rank}", b"1" if same_node is not False and _can_map(offer, device) else b"0")
    return json.loads(store.get(f"{_KEY}/ranks"))


def _can_map(offer: dict, device: torch.device) -> bool:
    if not offer or offer["node"] != node_id():
        return False
    try:
        probe = region_class(device).attach(offer["handle"], 4096)
    except (OSError, ValueError, LookupError, RuntimeError):
        return False
    try:
        return bytes(probe.buffer[:16].cpu().tolist()) == bytes.fromhex(offer["nonce"])
    finally:
        probe.close()


class SameNode:
    """The node-local half of a weight group: rank 0 (`rank` 0 here too) and the receivers that
    map its region, ordered by a gloo group of their own (`signals`)."""

    def __init__(self, store: dist.Store, rank: int, signals: dist.Backend, device: torch.device, timeout: timedelta):
        self.store, self.rank, self.signals, self.device = store, rank, signals, device
        self.region_cls = region_class(device)
        self.region: ShmRegion | CudaIpcRegion | None = None
        self.generation = 0  # regions made so far: both sides count them the same way
        self.timeout = timeout

    @staticmethod
    def layout(nbytes: list[int]) -> tuple[list[int], int]:
        """Each bucket's offset in the region, and the region's size."""
        offsets, end = [], 0
        for n in nbytes:
            offsets.append(end)
            end += -(-n // _ALIGN) * _ALIGN
        return offsets, max(end, _ALIGN)

    def _barrier(self) -> None:
        self.signals.barrier(dist.BarrierOptions()).wait(self.timeout)

    def _fit(self, nbytes: list[int]) -> list[int]:
        """The region, grown when this update needs more than the last one: rank 0 makes it, hands
        its handle to the receivers through the store, and unlinks it once all have mapped it."""
        offsets, total = self.layout(nbytes)
        if self.region is not None and self.region.nbytes >= total:
            return offsets
        if self.region is not None:
            self.region.close()
            self.region = None
        self.generation += 1
        key = f"{_KEY}/region/{self.generation}"
        if self.rank == 0:
            try:
                region = self.region_cls.create(total, self.device)
            except (OSError, RuntimeError) as err:
                why = (f"no room for a {total / 1e6:.0f} MB weight region ({err}): give {SHM_DIR} more space "
                       "(containers: --shm-size) or set learner.weight_sync_shm: false")  # fmt: skip
                self.store.set(key, json.dumps({"error": why}))  # the receivers fail now, not at a timeout
                raise RuntimeError(why) from err
            try:
                self.store.set(key, json.dumps(region.handle))
                self._barrier()  # every local receiver has mapped it
            finally:
                region.unlink()  # the name is gone: nothing to leak if any process dies from here on
            self.store.delete_key(key)
        else:
            handle = json.loads(self.store.get(key))
            if "error" in handle:
                raise RuntimeError(f"learner rank 0 made no weight region: {handle['error']}")
            region = self.region_cls.attach(handle, total)
            self._barrier()
        self.region = region
        return offsets

    # -- rank 0 ------------------------------------------------------------------------------

    def begin(self, nbytes: list[int]) -> list[torch.Tensor]:
        """Start an update of buckets of these sizes: waits until every local receiver is
        listening (so done with the previous update's views); returns each bucket's slice."""
        self._barrier()
        offsets = self._fit(nbytes)
        return [self.region.buffer[o : o + n] for o, n in zip(offsets, nbytes, strict=True)]

    def ready(self, k: int):
        """Tell the receivers bucket k is written; returns the pending signal."""
        self.region.written()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.signals.broadcast([torch.tensor([k], dtype=torch.int64)], opts)

    # -- receivers -------------------------------------------------------------------------------

    def receive(self, nbytes: list[int]) -> Iterator[torch.Tensor]:
        """Each bucket's slice of the region, as soon as rank 0 says it is written."""
        self._barrier()
        offsets = self._fit(nbytes)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for k, (offset, n) in enumerate(zip(offsets, nbytes, strict=True)):
            flag = torch.tensor([-1], dtype=torch.int64)
            self.signals.broadcast([flag], opts).wait(self.timeout)
            if int(flag) != k:
                raise RuntimeError(f"weight update out of order: bucket {int(flag)} signalled, {k} expected")
            yield self.region.buffer[offset : offset + n]

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None
