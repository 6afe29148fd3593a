"""An authenticated rendezvous store, bound to one address, for every process group the run opens.

Why: a process group's members find each other through a key-value store. PyTorch's TCPStore
listens on every interface and serves anyone who connects, so whoever can reach its port can
join as a rank and be sent the model's weights, or answer as the store and feed members a
forged rendezvous that points them at a sender of poisoned weights. That has happened: a
foreign process joined the weight group as rank 1 and received the weights.

How: `StoreServer` binds to exactly one address (never all interfaces) and makes every
connection prove, before it may read or write a key, that it holds the run's secret: HMAC-SHA256
over a fresh nonce from the server. The server then proves the same over the client's nonce,
so a member never takes its rendezvous from a fake store. Anything else (a stock TCPStore
client, random bytes, a silent socket, an oversized frame) is refused, recorded in `refused`
and logged. Each connection has its own thread and a handshake deadline, so a silent one
cannot hold up the members. After the handshake, length-prefixed frames of raw byte fields
(no pickle) carry the c10d Store operations; `AuthStore` is the client, a `dist.Store`, so
gloo, NCCL and `init_process_group` use it like any other store.

What this does not do: the data transports (gloo's and NCCL's own sockets) are not
authenticated. Their addresses are only learned through this store, which keeps strangers
from being invited, but anyone on the path can still read or inject into them: cluster
networks must be private. For the same reason, frames after the handshake carry no MAC.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import threading
import time
from datetime import timedelta

import psutil
import torch.distributed as dist

log = logging.getLogger(__name__)

_MAGIC = b"VESPOST1"  # opens both sides' handshake messages: anything else is not a member
_NONCE = 32
_MAC = 32
_KEEP_REFUSED = 20  # refused connections remembered (and logged one by one)
_MAX_FRAME = 64 << 20  # a frame claiming more is refused before anything is read into memory
_LEN = struct.Struct("!I")
_DEFAULT_TIMEOUT = timedelta(seconds=300)  # c10d's default store timeout
_CLIENT_HANDSHAKE_S = 30.0  # how long a client waits for the server's side of the handshake


class RendezvousError(RuntimeError):
    """The store could not be reached, or it or this process failed the proof of the secret."""


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def _send_frame(sock: socket.socket, fields: list[bytes]) -> None:
    body = b"".join(_LEN.pack(len(f)) + f for f in fields)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_frame(sock: socket.socket) -> list[bytes]:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if size > _MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the {_MAX_FRAME} byte limit")
    body, fields, at = _recv_exact(sock, size), [], 0
    while at < size:
        (n,) = _LEN.unpack_from(body, at)
        if at + _LEN.size + n > size:
            raise ValueError("a field runs past the end of its frame")
        fields.append(body[at + _LEN.size : at + _LEN.size + n])
        at += _LEN.size + n
    return fields


def _ms(seconds: float) -> bytes:
    """A timeout on the wire, in ms; 0 means none (c10d's kNoTimeout)."""
    return b"0" if seconds <= 0 else str(max(1, round(seconds * 1000))).encode()


def _every_interface(host: str) -> bool:
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a hostname: it resolves to one address


class StoreServer:
    """The store, served from daemon threads until close(). Only connections that prove the
    secret get to touch a key; every other one is counted in `refused_total` and the latest
    ones kept in `refused` as "ip:port (reason)" (bounded: a flood of strangers costs a
    counter, not memory, and logs its first connections and then one line per hundred)."""

    def __init__(
        self, host: str, secret: bytes, name: str = "process group", port: int = 0, handshake_timeout_s: float = 5.0
    ):
        if _every_interface(host):
            raise ValueError(f"the {name}'s store must bind one address, not {host!r} (every interface)")
        self.name = name
        self.refused: collections.deque[str] = collections.deque(maxlen=_KEEP_REFUSED)
        self.refused_total = 0
        self._secret, self._handshake_timeout_s = secret, handshake_timeout_s
        self._data: dict[bytes, bytes] = {}
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._closed = False
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(addr)
        self._listener.listen(128)
        threading.Thread(target=self._accept_loop, name=f"{name} store", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            conns = list(self._conns)
        for sock in [self._listener, *conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            except OSError:
                pass
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _refuse(self, peer: tuple, reason: str) -> None:
        self.refused.append(f"{peer[0]}:{peer[1]} ({reason})")
        self.refused_total += 1
        if self.refused_total <= _KEEP_REFUSED or self.refused_total % 100 == 0:
            log.warning("refused a connection to the %s from %s:%s: %s (%d refused so far)", self.name, peer[0],
                        peer[1], reason, self.refused_total)  # fmt: skip

    def _handshake(self, conn: socket.socket, peer: tuple) -> bool:
        nonce = secrets.token_bytes(_NONCE)
        conn.settimeout(self._handshake_timeout_s)
        try:
            conn.sendall(_MAGIC + nonce)
            if _recv_exact(conn, len(_MAGIC)) != _MAGIC:
                self._refuse(peer, "it does not speak this store's protocol (a stock TCPStore client?)")
                return False
            reply = _recv_exact(conn, _MAC + _NONCE)
        except TimeoutError:
            self._refuse(peer, f"it sent no proof of the run's secret within {self._handshake_timeout_s:g} s")
            return False
        except (OSError, EOFError):
            self._refuse(peer, "it hung up during the handshake")
            return False
        if not hmac.compare_digest(reply[:_MAC], _mac(self._secret, b"client", nonce)):
            self._refuse(peer, "it did not prove the run's secret")
            return False
        conn.sendall(_mac(self._secret, b"server", reply[_MAC:]))
        conn.settimeout(None)  # members may sit idle between requests for as long as the group lives
        return True

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            if self._handshake(conn, peer):
                while not self._closed:
                    _send_frame(conn, self._apply(_recv_frame(conn)))
        except EOFError:
            pass  # the member closed its store
        except (OSError, ValueError) as e:
            if not self._closed:
                log.warning("dropped a %s store connection from %s:%s: %s", self.name, peer[0], peer[1], e)
        finally:
            with self._cond:
                self._conns.discard(conn)
            conn.close()

    def _wait(self, keys: list[bytes], ms: bytes) -> bool:
        """Whether every key exists, waiting up to ms (0: forever). Runs in this connection's thread only."""
        ready = self._cond.wait_for(lambda: self._closed or all(k in self._data for k in keys), int(ms) / 1000 or None)
        return ready and not self._closed

    def _apply(self, request: list[bytes]) -> list[bytes]:
        data, ok = self._data, b"ok"
        with self._cond:
            self._cond.notify_all()  # every branch that writes wakes the waiters; a spurious wake is harmless
            match request:
                case [b"set", key, value]:
                    data[key] = value
                    return [ok]
                case [b"get", key, ms]:
                    return [ok, data[key]] if self._wait([key], ms) else [b"timeout"]
                case [b"add", key, delta]:
                    data[key] = str(int(data.get(key, b"0")) + int(delta)).encode()
                    return [ok, data[key]]
                case [b"compare_set", key, expected, desired]:
                    if (key not in data and expected == b"") or data.get(key) == expected:
                        data[key] = desired
                    return [ok, data.get(key, expected)]
                case [b"append", key, value]:
                    data[key] = data.get(key, b"") + value
                    return [ok]
                case [b"wait", *keys, ms]:
                    return [ok] if self._wait(keys, ms) else [b"timeout"]
                case [b"multi_get", *keys, ms]:
                    return [ok, *(data[k] for k in keys)] if self._wait(keys, ms) else [b"timeout"]
                case [b"multi_set", *pairs] if len(pairs) % 2 == 0:
                    data.update(zip(pairs[::2], pairs[1::2], strict=True))
                    return [ok]
                case [b"check", *keys]:
                    return [ok, b"1" if all(k in data for k in keys) else b"0"]
                case [b"delete_key", key]:
                    return [ok, b"1" if data.pop(key, None) is not None else b"0"]
                case [b"num_keys"]:
                    return [ok, str(len(data)).encode()]
        raise ValueError(f"malformed request {request[:1]!r}")


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class AuthStore(dist.Store):
    """Client of a StoreServer, usable wherever c10d takes a Store. One connection, one request
    at a time (a lock), so it is safe to share between the threads gloo and NCCL run."""

    def __init__(
        self, host: str, port: int, secret: bytes, timeout: timedelta = _DEFAULT_TIMEOUT, name: str = "process group"
    ):
        super().__init__()
        self.set_timeout(timeout)
        self._args = (host, port, secret, timeout, name)
        self._where = f"the {name}'s store at {host}:{port}"
        self._lock = threading.Lock()
        self._sock = self._connect(host, port, secret, timeout.total_seconds())

    def _connect(self, host: str, port: int, secret: bytes, timeout_s: float) -> socket.socket:
        deadline = time.monotonic() + timeout_s
        while True:  # the server may not be up yet: retry a refused connection until the timeout
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise RendezvousError(f"{self._where} refused connections for {timeout_s:g} s") from None
                time.sleep(0.1)
            except OSError as e:
                raise RendezvousError(f"could not reach {self._where}: {e}") from None
        handshake_s = min(_CLIENT_HANDSHAKE_S, max(1.0, deadline - time.monotonic()))
        sock.settimeout(handshake_s)
        try:
            hello = _recv_exact(sock, len(_MAGIC) + _NONCE)
            if hello[: len(_MAGIC)] != _MAGIC:
                raise RendezvousError(f"{self._where} does not speak this store's protocol")
            nonce = secrets.token_bytes(_NONCE)
            sock.sendall(_MAGIC + _mac(secret, b"client", hello[len(_MAGIC) :]) + nonce)
            proof = _recv_exact(sock, _MAC)
        except TimeoutError:
            sock.close()
            raise RendezvousError(f"{self._where} did not complete the handshake in {handshake_s:.1f} s") from None
        except (OSError, EOFError) as e:
            sock.close()
            raise RendezvousError(
                f"{self._where} ended the handshake ({e}): it refused this process's proof of the run's secret "
                "(is the secret the same on every member?) or is not this run's store"
            ) from None
        except RendezvousError:
            sock.close()
            raise
        if not hmac.compare_digest(proof, _mac(secret, b"server", nonce)):
            sock.close()
            raise RendezvousError(f"{self._where} did not prove the run's secret")
        return sock

    def _call(self, op: bytes, *fields: bytes, wait_s: float | None = None) -> list[bytes]:
        with self._lock:
            if self._sock is None:
                raise RendezvousError(f"the connection to {self._where} was lost earlier")
            # a blocking op may take wait_s on the server (0: forever): allow that and a margin
            self._sock.settimeout(None if wait_s == 0 else self.timeout.total_seconds() + (wait_s or 0) + 10)
            try:
                _send_frame(self._sock, [op, *fields])
                status, *values = _recv_frame(self._sock)
            except (OSError, EOFError, ValueError) as e:
                self._sock.close()
                self._sock = None
                raise RendezvousError(f"lost the connection to {self._where}: {e}") from None
        if status == b"timeout":
            keys = b", ".join(fields[:-1]).decode(errors="replace")
            raise dist.DistStoreError(f"{op.decode()} of {keys} on {self._where} timed out after {wait_s:g} s")
        return values

    def _wait_s(self, timeout: timedelta | None) -> float:
        return (timeout if timeout is not None else self.timeout).total_seconds()

    def set(self, key: str, value: str | bytes) -> None:
        self._call(b"set", _bytes(key), _bytes(value))

    def get(self, key: str) -> bytes:
        """The value, waiting up to the store's timeout for the key to be set (then DistStoreError)."""
        wait_s = self._wait_s(None)
        return self._call(b"get", _bytes(key), _ms(wait_s), wait_s=wait_s)[0]

    def add(self, key: str, amount: int) -> int:
        return int(self._call(b"add", _bytes(key), str(int(amount)).encode())[0])

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        return self._call(b"compare_set", _bytes(key), _bytes(expected_value), _bytes(desired_value))[0]

    def append(self, key: str, value: str | bytes) -> None:
        self._call(b"append", _bytes(key), _bytes(value))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        wait_s = self._wait_s(timeout)
        self._call(b"wait", *map(_bytes, keys), _ms(wait_s), wait_s=wait_s)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        wait_s = self._wait_s(None)
        return self._call(b"multi_get", *map(_bytes, keys), _ms(wait_s), wait_s=wait_s)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self._call(b"multi_set", *(_bytes(f) for kv in zip(keys, values, strict=True) for f in kv))

    def check(self, keys: list[str]) -> bool:
        return self._call(b"check", *map(_bytes, keys))[0] == b"1"

    def delete_key(self, key: str) -> bool:
        return self._call(b"delete_key", _bytes(key))[0] == b"1"

    def num_keys(self) -> int:
        return int(self._call(b"num_keys")[0])

    def has_extended_api(self) -> bool:
        return True  # append, multi_get and multi_set are served

    def clone(self) -> AuthStore:
        """A second connection to the same store (for callers that want one per thread)."""
        return AuthStore(*self._args)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def gloo_device(host: str):
    """A gloo device whose data sockets bind to host, the address the store is bound to, not the
    address the machine's hostname happens to resolve to."""
    return dist.ProcessGroupGloo.create_device(hostname=host)


def gloo_options(host: str, timeout: timedelta) -> dist.ProcessGroupGloo._Options:
    """Options for dist.ProcessGroupGloo(store, rank, world, options) with sockets bound to host."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [gloo_device(host)]
    return options


def interface_of(ip: str) -> str | None:
    """The network interface holding ip, for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME where the
    group is made by init_process_group (which takes no device)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addresses):
            return name
    return None
