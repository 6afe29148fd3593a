"""The learner's default process group (DeepSpeed's), formed over an authenticated store.

torch's env:// rendezvous would open a TCPStore on every interface, for anyone to join. Rank 0
hosts a store instead that only ranks proving the group's secret may use, every rank joins the
default group through it, and DeepSpeed then finds the group initialised and uses it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from runtime.rendezvous import AuthStore, StoreServer, interface_of
from weightsync.transport import node_ip

GROUP_NAME = "learner group"  # how the store names itself in its logs and refusals
TIMEOUT = timedelta(minutes=30)

# torch keeps only the C++ half of a store: the Python one must outlive the group
_DEFAULT_STORE: list[AuthStore] = []


def host_store(host: str, secret: str) -> StoreServer:
    """Rank 0's rendezvous store, bound to `host` and open only to ranks that prove `secret`
    (hex); the secret stays on the server so a single in-process rank can join its own."""
    server = StoreServer(host, bytes.fromhex(secret), name=GROUP_NAME)
    server.secret_hex = secret
    return server


def join_default_group(store: tuple[str, int], secret: str, rank: int, world_size: int, backend: str) -> None:
    """Form the default process group over the store at `store`, proving `secret` (hex). The
    backend's own sockets bind to the store's interface, not to every one."""
    if dist.is_initialized():
        return
    interface = interface_of(store[0] if store[0].startswith("127.") else node_ip())
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME", interface)
    client = AuthStore(store[0], store[1], bytes.fromhex(secret), TIMEOUT, name=GROUP_NAME)
    _DEFAULT_STORE.append(client)
    dist.init_process_group(backend, store=client, rank=rank, world_size=world_size, timeout=TIMEOUT)
