"""The authenticated rendezvous store: members get in and form a real gloo group; nothing else
does (wrong secret, stock TCPStore client, silent socket, forged server, another interface)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import struct
import threading
import time
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as dist

from runtime import rendezvous
from runtime.rendezvous import AuthStore, RendezvousError, StoreServer, gloo_options, interface_of

SECRET = b"the run's secret"
LOOPBACK = "127.0.0.1"


@pytest.fixture
def server():
    srv = StoreServer(LOOPBACK, SECRET, name="weight group", handshake_timeout_s=1.0)
    yield srv
    srv.close()


def member(srv: StoreServer, timeout_s: float = 10.0, secret: bytes = SECRET) -> AuthStore:
    return AuthStore(*srv.address, secret, timeout=timedelta(seconds=timeout_s), name="weight group")


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- two real processes forming a gloo group through the store -------------------------------


def _gloo_rank(rank: int, port_queue, result_queue) -> None:
    timeout = timedelta(seconds=30)
    srv = None
    if rank == 0:
        srv = StoreServer(LOOPBACK, SECRET, name="weight group")
        port_queue.put(srv.address[1])
        port = srv.address[1]
    else:
        port = port_queue.get(timeout=30)
    store = AuthStore(LOOPBACK, port, SECRET, timeout=timeout, name="weight group")
    group = dist.ProcessGroupGloo(dist.PrefixStore("test", store), rank, 2, gloo_options(LOOPBACK, timeout))
    tensor = torch.arange(8, dtype=torch.float32) if rank == 0 else torch.zeros(8)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()
    group.barrier().wait()  # rank 0 keeps serving the store until rank 1 is done with it
    result_queue.put((rank, tensor.tolist()))
    if srv is not None:
        srv.close()


def test_two_processes_form_a_gloo_group_and_broadcast():
    ctx = mp.get_context("spawn")
    port_queue, result_queue = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port_queue, result_queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(result_queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results[1] == list(range(8))


# --- who gets refused ----------------------------------------------------------------------------


def test_wrong_secret_fails_fast_and_is_recorded(server, caplog):
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=r"weight group's store at 127\.0\.0\.1:\d+ .*proof"):
        member(server, timeout_s=30, secret=b"a guess")
    assert time.monotonic() - start < 2.0
    assert len(server.refused) == 1
    assert server.refused[0].startswith(f"{LOOPBACK}:")
    assert "did not prove the run's secret" in server.refused[0]
    assert any(
        r.levelno == logging.WARNING
        and r.getMessage().startswith(f"refused a connection to the weight group from {LOOPBACK}:")
        and r.getMessage().endswith(": it did not prove the run's secret (1 refused so far)")
        for r in caplog.records
    )
    legit = member(server)  # the refusal did not disturb the store
    legit.set("k", b"v")
    assert legit.get("k") == b"v"


def test_a_flood_of_strangers_costs_a_counter_not_memory(server):
    for _ in range(rendezvous._KEEP_REFUSED + 10):
        with pytest.raises(RendezvousError):
            member(server, timeout_s=10, secret=b"a guess")
    wait_until(lambda: server.refused_total == rendezvous._KEEP_REFUSED + 10)
    assert len(server.refused) == rendezvous._KEEP_REFUSED
    member(server).set("still", b"serving")  # and members still get in


def test_stock_tcpstore_client_gets_nothing(server):
    with pytest.raises(RuntimeError):  # DistNetworkError / DistStoreError, both RuntimeErrors
        store = dist.TCPStore(*server.address, is_master=False, timeout=timedelta(seconds=5))
        store.set("intruder", b"x")
        store.get("intruder")
    assert server.refused and all("does not speak this store's protocol" in r for r in server.refused)
    assert member(server).num_keys() == 0


def test_random_bytes_are_refused(server):
    with socket.create_connection(server.address) as raw:
        raw.sendall(rendezvous._MAGIC + bytes(range(64)))  # right magic, then garbage as the "proof"
        raw.settimeout(5)
        raw.recv(40)  # the server's hello
        assert raw.recv(100) == b""  # then it hangs up
    wait_until(lambda: server.refused)
    assert "did not prove the run's secret" in server.refused[0]


def test_silent_connection_does_not_block_members():
    srv = StoreServer(LOOPBACK, SECRET, name="weight group", handshake_timeout_s=3.0)
    silent = socket.create_connection(srv.address)
    try:
        store = member(srv)
        store.set("joined", "yes")  # a str value is stored as its utf-8 bytes
        assert store.get("joined") == b"yes"
        assert not srv.refused  # served while the silent socket is still inside its handshake window
        wait_until(lambda: srv.refused)
        assert "sent no proof of the run's secret within 3 s" in srv.refused[0]
    finally:
        silent.close()
        srv.close()


def test_oversized_frame_from_a_member_drops_its_connection(server):
    store = member(server)
    store._sock.sendall(struct.pack("!I", 1 << 30))  # claims a 1 GiB frame
    store._sock.settimeout(5)
    assert store._sock.recv(10) == b""
    assert member(server).num_keys() == 0  # others are unaffected


# --- members refuse a fake store -----------------------------------------------------------------


def test_fake_store_with_another_secret_is_rejected():
    fake = StoreServer(LOOPBACK, b"not the run's secret", name="weight group")
    try:
        with pytest.raises(RendezvousError, match="weight group's store"):
            member(fake)
    finally:
        fake.close()


def test_fake_store_that_accepts_anyone_fails_its_own_proof():
    """An impostor that skips checking the client and answers with a made-up proof."""
    listener = socket.create_server((LOOPBACK, 0))

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(rendezvous._MAGIC + bytes(32))
            rendezvous._recv_exact(conn, len(rendezvous._MAGIC) + 64)
            conn.sendall(bytes(32))
            time.sleep(1)

    threading.Thread(target=impostor, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(RendezvousError, match=rf"store at 127\.0\.0\.1:{port} did not prove the run's secret"):
            AuthStore(LOOPBACK, port, SECRET, timeout=timedelta(seconds=5), name="weight group")
    finally:
        listener.close()


# --- binding ------------------------------------------------------------------------------------


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_bound_to_one_address_only(server):
    other = _non_loopback_ipv4()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, server.address[1]), timeout=2).close()
    with pytest.raises(RendezvousError, match="refused connections"):
        AuthStore(other, server.address[1], SECRET, timeout=timedelta(seconds=0.3))
    assert interface_of(other) is not None
    assert interface_of(LOOPBACK) is not None
    assert interface_of("203.0.113.7") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_refuses_every_interface(host):
    with pytest.raises(ValueError, match="every interface"):
        StoreServer(host, SECRET)


# --- store semantics ----------------------------------------------------------------------------


def test_get_of_a_missing_key_times_out_clearly(server):
    store = member(server, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match=r"get of missing on the weight group's store .* timed out"):
        store.get("missing")
    assert 0.25 < time.monotonic() - start < 2.0
    with pytest.raises(dist.DistStoreError, match="timed out"):
        store.wait(["missing"], timedelta(seconds=0.2))
    store.set("after", b"ok")  # the connection is still in step after a timeout
    assert store.get("after") == b"ok"


def test_blocked_get_does_not_block_other_members(server):
    waiter, writer = member(server), member(server)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(waiter.get("later")))
    thread.start()
    time.sleep(0.1)
    writer.set("other", b"1")  # served while the waiter blocks
    assert writer.check(["other"])
    writer.set("later", b"\x00binary\xff")
    thread.join(timeout=5)
    assert got == [b"\x00binary\xff"]
    waiter.wait(["later", "other"])
    waiter.wait(["later"], timedelta(seconds=1))


def test_store_operations(server):
    store = member(server)
    assert store.add("counter", 1) == 1
    assert store.add("counter", 2) == 3
    assert store.get("counter") == b"3"  # counters are decimal strings, as in c10d
    # compare_set: c10d's HashStore/TCPStore semantics
    assert store.compare_set("cas", "", "first") == b"first"  # missing key, empty expectation: set
    assert store.compare_set("cas", "wrong", "second") == b"first"  # mismatch: current value
    assert store.compare_set("cas", "first", "second") == b"second"
    assert store.compare_set("absent", "x", "y") == b"x"  # missing key, other expectation: not set
    assert not store.check(["absent"])
    assert store.check(["cas", "counter"]) and not store.check(["cas", "absent"])
    assert store.num_keys() == 2
    assert store.delete_key("cas") and not store.delete_key("cas")
    assert store.num_keys() == 1
    store.multi_set(["a", "b"], [b"1", "2"])
    assert store.multi_get(["b", "a"]) == [b"2", b"1"]
    store.append("a", b"+")
    assert store.get("a") == b"1+"
    other = store.clone()
    assert other.get("a") == b"1+"
    prefixed = dist.PrefixStore("p", store)  # called from C++, as the backends do
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v" and store.get("p/k") == b"v"
    assert prefixed.add("n", 5) == 5
