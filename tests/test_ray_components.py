"""Ray's errors in the loop's terms (vespo.orchestration.ray_components): the fault tests on fakes raise
EngineDown and EngineLost directly, so the translation from what Ray raises is checked here,
on Ray's own exception classes (no cluster needed). Also how a single-machine run starts its
local Ray: on loopback, in a process group of its own, with a private token."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray.exceptions as rex

from rollout.actor import EngineNotStarted
from vespo.orchestration import ray_components, ray_start
from vespo.orchestration.contracts import EngineDown, EngineLost
from vespo.orchestration.ray_components import RayPending, _engine_error

ROOT = Path(__file__).resolve().parents[1]


def failing(monkeypatch, err: BaseException, engine: bool = True) -> RayPending:
    """A pending call whose ray.get raises err, as a call to a dead or restarting actor does."""

    def get(refs, timeout=None):
        raise err

    monkeypatch.setattr(ray_components.ray, "get", get)
    return RayPending(object(), engine=engine)


def test_a_dead_actor_ray_will_not_restart_is_lost_for_good():
    assert isinstance(_engine_error(rex.ActorDiedError()), EngineLost)


@pytest.mark.parametrize(
    "err",
    [
        rex.ActorUnavailableError("restarting", b"\x00" * 16),  # Ray is restarting it
        rex.RayTaskError("poll", "traceback", EngineNotStarted("no engine")).as_instanceof_cause(),  # back, no engine
    ],
    ids=["unavailable", "restarted-without-engine"],
)
def test_an_engine_ray_is_restarting_is_down_for_now(err):
    translated = _engine_error(err)
    assert isinstance(translated, EngineDown) and not isinstance(translated, EngineLost)


def test_any_other_failure_passes_through_unchanged(monkeypatch):
    bug = rex.RayTaskError("generate", "traceback", ZeroDivisionError("x")).as_instanceof_cause()
    assert _engine_error(bug) is bug
    with pytest.raises(ZeroDivisionError):
        failing(monkeypatch, bug).result()


def test_a_pending_engine_call_raises_the_loops_terms_and_keeps_the_cause(monkeypatch):
    with pytest.raises(EngineLost) as lost:
        failing(monkeypatch, rex.ActorDiedError()).result()
    assert isinstance(lost.value.__cause__, rex.ActorDiedError)
    with pytest.raises(EngineDown):
        failing(monkeypatch, rex.ActorUnavailableError("restarting", b"\x00" * 16)).result()
    # a learner call (engine=False) is not an engine's death: Ray's error reaches the controller as is
    with pytest.raises(rex.ActorDiedError):
        failing(monkeypatch, rex.ActorDiedError(), engine=False).result()


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listening(processes) -> set[tuple[int, str, str, int]]:
    """(pid, name, address, port) of every socket these processes listen on."""
    found = set()
    for p in processes:
        try:
            found |= {(p.pid, p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN}  # fmt: skip
        except psutil.Error:
            pass
    return found


# Ray keeps the token it read for the life of a process: a Ray started here under another HOME
# would leave this pytest process unable to reach any later Ray. The run starts in a process of its own.
LOCAL_RAY = """
import sys, ray
from vespo.config import run_config
from vespo.orchestration import ray_start
ray_start.init_ray(run_config.load(None, []))
print(ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()), flush=True)
sys.stdin.readline()  # Ray stays up while the test looks at it
ray.shutdown()
"""


def test_a_local_run_starts_ray_on_loopback_in_a_process_group_of_its_own(tmp_path):
    """What a single-machine run starts (init_ray, no address): no Ray process listens beyond
    loopback (GCS, raylet, workers, agents, Prometheus metrics), none is in the driver's
    process group (a signal to that group reaches the driver only), the token Ray needs is
    readable by its owner only, and ray.shutdown ends them all."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                             "RAY_AUTH_TOKEN_PATH")}  # fmt: skip
    env["HOME"] = str(tmp_path)  # a fresh ~/.ray: this run makes the token
    driver = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    family: list[psutil.Process] = []
    try:
        assert driver.stdout.readline().strip() == "127.0.0.1"  # type: ignore[union-attr]
        # the agents open their servers after the node is up: wait until nothing new opens
        seen, still = set(), 0
        deadline = time.monotonic() + 60
        while still < 4 and time.monotonic() < deadline:
            time.sleep(1)
            family = psutil.Process(driver.pid).children(recursive=True)
            now = _listening(family)
            still, seen = (still + 1, seen) if now <= seen and len(seen) > 3 else (0, seen | now)
        names = {name for _, name, _, _ in seen}
        assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), seen
        exposed = sorted(s for s in seen if not _is_loopback(s[2]))
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        group = os.getpgid(driver.pid)
        shared = [(p.pid, p.name()) for p in family if p.is_running() and os.getpgid(p.pid) == group]
        assert not shared, f"Ray processes in the driver's process group: {shared}"
        token = tmp_path / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    finally:
        driver.communicate("\n", timeout=120)
    time.sleep(2)
    alive = [(p.pid, p.name()) for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes left after ray.shutdown: {alive}"


def test_an_existing_ray_token_is_made_private_and_a_users_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)  # as Ray writes it
    ray_start.private_ray_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # the user's own choice: not ours to change
    ray_start.private_ray_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o644
