"""Publishing the learner's weights to the engines: group formation, broadcast, and what to do
when a receiver dies.

A weight group has a fixed membership, so an engine restart means a new group for all: the
dead engine is restarted, the group re-formed with every engine, the weights sent again, and
only then is the restarted engine fed (never generating with stale weights it would mislabel).
The transport itself (bucket plan, wire format, authenticated rendezvous, gloo or NCCL) is
`weightsync.transport`; this module only decides who joins and when.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from vespo.orchestration.contracts import EngineDown, EngineLost, Learner
from vespo.orchestration.fleet import EngineFleet
from weightsync.transport import bucket_bytes_of, plan_from_wire

log = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, learner: Learner, fleet: EngineFleet, backend: str, bucket_bytes: int = 64 << 20):
        self.learner, self.fleet, self.backend, self.bucket_bytes = learner, fleet, backend, bucket_bytes
        self.version = 0  # the engines' weights: the learner step they were published at
        self.seconds = 0.0  # time spent publishing (the `sync` clock)
        self.plan: list = []
        self.bytes = 0  # what one publish sends each engine: the full weights, or the adapter under LoRA

    def form(self) -> None:
        """(Re)build the learner -> engines group: rank 0 is the learner, then every receiver of
        every engine in order; members prove a secret made for this group."""
        receivers = self.fleet.receivers
        host, port, secret = self.learner.open_weight_sync(sum(receivers), self.bucket_bytes)
        log.info("weight group: rank 0 at %s:%d, %d receiver(s); members must prove the group's secret",
                 host, port, sum(receivers))  # fmt: skip
        offsets = np.cumsum([1, *receivers[:-1]]).tolist()
        joins = [e.join_weight_group(host, port, off, sum(receivers) + 1, self.backend, secret)
                 for e, off in zip(self.fleet.engines, offsets, strict=True)]  # fmt: skip
        connected = self.learner.connect_weight_sync()
        for pending in [connected, *joins]:
            pending.result()
        self.plan = self.learner.weight_plan()
        self.bytes = sum(bucket_bytes_of(b) for b in plan_from_wire(self.plan))

    def publish(self, version: int) -> None:
        """Every engine generates with the learner's weights of step `version` from now on."""
        started = time.perf_counter()
        sent = not self.fleet.dead and self._send(version)
        while not sent:
            sent = self._recover(version)
        self.version = version
        self.seconds += time.perf_counter() - started

    def recover(self) -> None:
        """Bring the fleet's dead engines back with the weights they should have."""
        while self.fleet.dead:
            self._recover(self.version)

    def _recover(self, version: int) -> bool:
        started = time.perf_counter()
        self.fleet.restart_dead()
        self.form()
        if not self._send(version):
            return False  # another engine died meanwhile: restart it too, re-form, send again
        # every engine restarted so far, by this attempt or by one whose broadcast failed: all have the weights now
        restarted = sorted(self.fleet.restarting)
        self.fleet.back(restarted)
        log.warning("engine(s) %s back after %.0fs", ", ".join(f"engine-{i}" for i in restarted),
                    time.perf_counter() - started)  # fmt: skip
        return True

    def _send(self, version: int) -> bool:
        """One broadcast to every engine; False if a receiver died (it is marked for restart)."""
        receiving = [e.receive_weights(self.plan, version) for e in self.fleet.engines]
        sending = self.learner.broadcast_weights(self.plan)
        ok = True
        for i, pending in enumerate(receiving):
            try:
                pending.result()
            except (EngineDown, EngineLost) as err:
                self.fleet.mark_dead(i, err)  # raises when the engine is lost for good
                ok = False
            except Exception:
                sending.result()  # a learner rank that died mid-broadcast is the cause: its error is the one to report
                raise
        if not ok:
            # the group lost a member: the learner's side fails (gloo sees the peer gone) or finishes
            try:
                sending.result(timeout=120)
            except Exception as err:  # noqa: BLE001 - the group is rebuilt either way
                log.warning("weight broadcast to a dead engine ended with: %s", str(err).splitlines()[0])
            return False
        sending.result()
        return True
