"""Starting Ray for a run, or joining the cluster it names, and checking the run fits it.

A run with `train.ray_address` (or RAY_ADDRESS) joins that cluster. Otherwise it starts a
local Ray of its own, on loopback and in a process group of its own, with a private token (see
`_local_head` and `private_ray_token` for why each).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

import numpy as np
import ray

from vespo.config.placement import PlacementError, cluster_from_ray, cpus_needed, demand_of, plan

log = logging.getLogger(__name__)


def init_ray(cfg) -> None:
    if ray.is_initialized():
        return
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # a local run on a small machine: logical CPUs enough for the layout (they share the cores)
    need = cpus_needed(cfg)
    private_ray_token()
    with _local_head():
        ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))), include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=True)  # fmt: skip


@contextlib.contextmanager
def _local_head():
    """How the local Ray head of a single-machine run is started (Ray's own start-up code, two
    switches set around `ray.init` only):
    - on loopback: Ray binds every server (GCS, raylet, workers, agents, its Prometheus
      metrics) to the node's address, and `ray.init` turns a given 127.0.0.1 into the machine's
      external address unless its single-machine mode is on (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
      read as ray_constants.ENABLE_RAY_CLUSTER); with it, the node's address is 127.0.0.1;
    - in a process group of their own: otherwise Ray's processes share the driver's, and a
      signal to that group (SIGTERM from `timeout`, `kill -- -PGID`, a batch scheduler) kills
      the GCS and raylet while the driver is finishing its step (Ray blocks only SIGINT in
      them). Now the driver alone gets it, finishes the step and checkpoints with every actor
      alive. They stay in the driver's session: Linux schedules each session as one group
      (autogroup), and a session of their own would give the driver, pinned beside the engine,
      half of the engine's core (the embedded run went 4x slower). The processes still end
      with the run: `ray.shutdown` stops them, and the kernel does if the driver dies (Ray's
      fate sharing, PR_SET_PDEATHSIG), which is why the group is only changed where that is
      available."""
    from ray._private import ray_constants, services, utils

    popen, cluster = services.ConsolePopen, ray_constants.ENABLE_RAY_CLUSTER

    class OwnProcessGroup(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "process_group": 0})

    if utils.detect_fate_sharing_support():
        services.ConsolePopen = OwnProcessGroup
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        services.ConsolePopen, ray_constants.ENABLE_RAY_CLUSTER = popen, cluster


def private_ray_token() -> None:
    """Ray's token (~/.ray/auth_token, made by the first `ray.init` with token authentication)
    readable by its owner only: Ray writes it with the default mode (0644 under the usual
    umask). Made here first, mode 0600, when Ray would make it; an existing one is narrowed.
    A token the user supplies (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is left as it is."""
    users = "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
    if users or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # the user's own token, or none (Ray writes none then)
    path = Path.home() / ".ray" / "auth_token"
    try:
        if path.exists():
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator makes: 256 random bits
    except FileExistsError:
        pass  # another run made it at the same moment
    except OSError as err:
        log.warning("could not make Ray's token %s private: %s", path, err)


def check_resources(cfg) -> None:
    """A clear error, before anything starts, when the layout does not fit the cluster."""
    cluster = cluster_from_ray(ray.nodes())
    try:
        plan(cluster, demand_of(cfg))
    except PlacementError as err:
        raise PlacementError(f"the run does not fit this Ray cluster: {err}") from err
