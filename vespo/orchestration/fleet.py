"""The rollout engines as one fleet: start, feeding within the admission rule, what each engine
holds, failed groups, and bringing dead engines back without losing or doubling a prompt.

Every prompt handed out is *held* (group id -> sample, engine) until the learner trains its
group, it fails for good, or a dead engine's share is requeued. That one record answers the
three questions recovery and checkpoints ask: what did a dead engine hold, what is in flight
at a snapshot, what must a resumed run hand out again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from rollout.records import PromptItem
from rollout.tasks.registry import TaskSample
from vespo.orchestration.contracts import Buffer, Engine, EngineDown, EngineLost, Failure
from vespo.orchestration.prompts import PromptStream

log = logging.getLogger(__name__)


class EngineFleet:
    def __init__(
        self,
        engines: list[Engine],
        buffer: Buffer,
        prompts: PromptStream,
        make_item: Callable[[str, TaskSample], PromptItem],
        group_retries: int = 2,
        restart_timeout_s: float = 600.0,
        max_restarts: int = 3,
    ):
        self.engines, self.buffer, self.prompts = engines, buffer, prompts
        self.make_item = make_item
        self.group_retries, self.restart_timeout_s, self.max_restarts = group_retries, restart_timeout_s, max_restarts
        self.held: dict[str, tuple[str, int]] = {}  # group id -> (sample id, engine index)
        # the feeder thread hands out while the loop settles, recovers and checkpoints: `_feeding` is
        # held for one engine's round (its calls included) and by recovery; `_lock` only ever briefly,
        # over `held`, so settling a trained batch never waits for an engine's answer
        self._feeding = threading.Lock()
        self._lock = threading.Lock()
        self.dead: set[int] = set()  # engines to restart
        self.restarting: set[int] = set()  # restarted, not yet given the current weights: fed nothing
        self.receivers: list[int] = []  # weight-group ranks each engine brings
        self.in_flight = 0  # groups inside engines at the last feed (sync rounds end when it is 0)
        self.last_failed = 0  # groups reported failed at the last feed
        self.restarts, self.requeued = 0, []  # engine restarts; group ids requeued from dead engines
        self.refused_prompts = self.retried_groups = self.dropped_groups = 0
        self._retries: dict[str, int] = {}

    @property
    def samples(self) -> dict[str, TaskSample]:
        return self.prompts.by_id

    def started(self, infos: list[dict], quiet: bool = False) -> None:
        """What each engine's start() returned: its backend, start-up time, weight-group ranks."""
        if not quiet:
            for info in infos:
                where = f" on cores {info['cores']}" if "cores" in info else ""
                log.info("%s: %s engine up in %.0fs%s", info["engine_id"], info["backend"], info["startup_s"], where)
        self.infos, self.receivers = infos, [info["receivers"] for info in infos]

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, version: int, per_engine: float, budget: int | None = None) -> int:
        """One round over the live engines: collect their failed groups, then top each up to
        `per_engine` groups in flight, every group admitted by the buffer first (never more
        than max_staleness versions ahead of the learner); at most `budget` new groups in all.
        Returns how many were handed out."""
        fed, in_flight, self.last_failed = 0, 0, 0
        # once the buffer refuses, it admits nothing more at this version until groups are trained,
        # dropped or let go of: asking for every further engine's share would be a remote call per
        # engine per round, all refused (the async feeder's usual state when the learner is the
        # bottleneck); what frees up meanwhile is handed out next round
        refused = False
        live = [i for i in range(len(self.engines)) if i not in self.dead and i not in self.restarting]
        for k, i in enumerate(live):
            engine = self.engines[i]
            with self._feeding:
                if i in self.dead or i in self.restarting:
                    continue
                try:
                    count, failed = engine.poll()
                except EngineDown as err:
                    self.mark_dead(i, err)
                    continue
                if failed and self.failed(failed):
                    refused = False  # their admission slots are free again
                self.last_failed += len(failed)
                if count < 0:  # restarted by Ray, not started yet
                    self.mark_dead(i, EngineDown(f"engine-{i} came back without an engine"))
                    continue
                in_flight += count
                want = per_engine - count
                if budget is not None:  # spread what is left over the engines not yet fed this round
                    want = min(want, math.ceil((budget - fed) / (len(live) - k)))
                admitted = self.buffer.admit(version, int(want)) if want > 0 and not refused else 0
                refused = refused or admitted < want
                if not admitted:
                    continue
                taken = [self.prompts.next() for _ in range(admitted)]
                with self._lock:
                    self.held.update({gid: (sample.id, i) for gid, sample in taken})
                items = [self.make_item(gid, sample) for gid, sample in taken]
                engine.submit(items)  # if the engine dies with them, recovery requeues them
                fed += len(items)
                in_flight += len(items)
        self.in_flight = in_flight
        return fed

    def failed(self, failures: list[Failure]) -> int:
        """Groups that failed inside a live engine. A refused prompt is dropped at once; any other
        failure is handed out again, up to group_retries times, then dropped; both counted
        (faults/*), and each frees its admission slot, or enough of them would stop feeding.
        Returns how many slots it freed."""
        again, released = [], 0
        for gid, why, refused in failures:
            with self._lock:
                held = self.held.pop(gid, None)
            if held is None:
                continue  # already accounted for (an engine recovery requeued it)
            released += 1
            tries = self._retries.get(gid, 0)
            if refused:
                self.refused_prompts += 1
                if self.refused_prompts <= 3 or self.refused_prompts % 100 == 0:
                    log.warning("prompt refused (%d so far, never retried): %s", self.refused_prompts, why)
            elif tries >= self.group_retries:
                self.dropped_groups += 1
                with self._lock:
                    self._retries.pop(gid, None)
                log.error("group %s dropped after %d attempt(s): %s", gid, tries + 1, why)
            else:
                self._retries[gid] = tries + 1
                self.retried_groups += 1
                again.append((gid, self.samples[held[0]]))
                log.warning("group %s failed in its engine (%s); handing it out again (retry %d of %d)",
                            gid, why, tries + 1, self.group_retries)  # fmt: skip
        if released:
            self.buffer.abandon(released)
        if again:
            self.prompts.requeue(again)
        return released

    def forget_delivered(self) -> None:
        """Stop holding groups the buffer has received (trained, waiting, or dropped as too stale):
        neither a dead engine nor a checkpoint needs to hand those out again, and the record
        stays as small as what is really in flight. Every trained group is among them."""
        with self._lock:
            held = list(self.held)
        delivered = self.buffer.seen_groups(held) if held else []
        with self._lock:
            for gid in delivered:
                self.held.pop(gid, None)
                self._retries.pop(gid, None)

    # -- faults -----------------------------------------------------------------------------

    def mark_dead(self, i: int, err: BaseException) -> None:
        """Engine i failed a call. Ray restarts it (rollout.max_restarts) unless it is out of
        restarts, which stops the run."""
        if isinstance(err, EngineLost):
            raise EngineLost(
                f"engine-{i} died and Ray will not restart it (rollout.max_restarts {self.max_restarts} used up): {err}"
            ) from err
        if i not in self.dead:
            log.warning("engine-%d is down (%s); Ray is restarting it", i, str(err).splitlines()[0][:200])
        self.dead.add(i)

    def restart_dead(self) -> list[int]:
        """Wait for Ray's restart of every dead engine and start its engine again; they stay
        unfed until `back` (the weight sync gives them the current weights first)."""
        dead = sorted(self.dead)
        for i in dead:
            info = self.engines[i].restart(self.restart_timeout_s)
            self.engines[i].set_buffer(self.buffer)  # the restart got the buffer it was created with
            log.warning("engine-%d restarted (%s engine up in %.0fs)", i, info["backend"], info["startup_s"])
        with self._feeding:  # never in neither set: the feeder would feed it before it has the weights
            self.restarting.update(dead)
            self.dead.difference_update(dead)
        return dead

    def back(self, engines: list[int], requeue: bool = True) -> None:
        """These engines have the current weights: feed them again, and hand out again what they
        held that the buffer never received (none lost; none generated twice, since a group
        reaches the buffer whole or not at all)."""
        with self._feeding, self._lock:
            held = [gid for gid, (_, e) in self.held.items() if e in engines] if requeue else []
            delivered = set(self.buffer.seen_groups(held)) if held else set()
            lost = [gid for gid in held if gid not in delivered]
            self.prompts.requeue([(gid, self.samples[self.held.pop(gid)[0]]) for gid in lost])
            if lost:
                self.buffer.abandon(len(lost))  # admitted once; admitted again when handed out
            self.requeued += lost
            self.restarting.difference_update(engines)
            self.restarts += len(engines)  # each one recovered
        if requeue:
            log.warning("requeued %d prompt(s) the dead engine(s) held; %d had reached the buffer",
                        len(lost), len(delivered))  # fmt: skip

    # -- checkpoints ------------------------------------------------------------------------

    def resume_point(self, snapshot: Callable[[], list[str]]) -> dict:
        """Take the buffer snapshot (`snapshot` returns the ids of the groups it had received) and,
        with no prompt handed out, requeued or settled meanwhile, what a resumed run goes on from:
        the prompt stream's position, the prompts handed out that the snapshot lacks (in flight),
        and those waiting to be handed out again (the buffer's admission count let go of them).
        Recorded apart, a prompt handed out in between is counted in the position but in neither
        list, and is never generated; or admitted after the snapshot and let go of twice."""
        with self._feeding, self._lock:
            seen = set(snapshot())
            in_flight = [[gid, sid] for gid, (sid, _) in self.held.items() if gid not in seen]
            waiting = [[gid, sample.id] for gid, sample in self.prompts.requeued]
            return {"prompts": dict(vars(self.prompts.state)), "requeue": in_flight + waiting,
                    "requeue_abandoned": len(waiting)}  # fmt: skip

    def stats(self) -> list:
        out = []
        for i, e in enumerate(self.engines):
            try:
                out.append(e.stats())
            except EngineDown as err:
                self.mark_dead(i, err)  # recovered before the next batch
        return out

    def shutdown(self) -> None:
        for e in self.engines:
            try:
                e.shutdown()
            except Exception as err:  # noqa: BLE001 - a dead engine must not stop the others from closing
                log.warning("engine shutdown: %s", err)
