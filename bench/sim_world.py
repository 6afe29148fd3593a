"""The simulation's clock, its event thread, and the ledger of remote calls.

Time is simulated and moves only while nothing computes: when every controller thread (the
loop's, the async feeder's) waits, for a deadline (a learner step's end, a sleep, a get_batch
timeout) or for a group to reach the buffer, the event thread moves the clock to the next
deadline or engine event, handles it, and wakes whoever was waiting for it. At most `scale`
simulated seconds pass per real second (a scaled clock; 0: as fast as the machine goes), but
the results do not depend on how fast or loaded the machine is: a thread woken and not yet
running holds the clock where it is.

The controller's own code costs what it really costs: each controller thread owes the clock
the CPU time it spent (its own, the simulated components' and the buffer's left out) plus a
Ray round trip for each blocking remote call, and waits that debt off before its next wait.

The controller's modules read `time.perf_counter` and `time.sleep`; `scaled_clock` points
them at this clock for the length of a run, so their timeouts, waits and RunSummary are in
simulated seconds. The code itself is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

from vespo.orchestration import controller, sources, weight_publisher

PAY_EVERY_S = 0.05  # simulated seconds of round trips a thread gathers before it waits them off

# remote calls that return at once in the real system (fire and forget, or a Ray future): the
# caller pays only the dispatch; the others are blocking round trips
DISPATCHED = {"engine.submit", "engine.receive_weights", "engine.join_weight_group", "learner.broadcast_weights",
              "learner.connect_weight_sync", "learner.train"}  # fmt: skip


class Ledger:
    """Calls into the contract methods (Ray remote calls in the real system) and the CPU time
    spent inside them, by kind and by calling thread."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self.thread_cpu: defaultdict[int, float] = defaultdict(float)
        self.thread_kinds: defaultdict[int, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()

    def reset(self) -> None:
        self.__init__()

    def add(self, kind: str, cpu_s: float) -> None:
        ident = threading.get_ident()
        with self._lock:
            self.calls[kind] += 1
            self.cpu[kind] += cpu_s
            self.thread_cpu[ident] += cpu_s
            self.thread_kinds[ident][kind] += 1


def remote(kind: str):
    """Count a contract method's calls and the CPU they take in the caller's thread, and charge
    the caller the call's round trip."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            world = self.world
            account = world.enlist()
            started = time.thread_time()
            if account is not None:
                account.in_call, account.call_started = account.in_call + 1, started
            try:
                return fn(self, *args, **kwargs)
            finally:
                self.ledger.add(kind, time.thread_time() - started)
                if account is not None:
                    account.in_call -= 1
                    world.charge(account, kind)

        return call

    return wrap


class _Account:
    """A controller thread: what it owes the clock and what it has computed. Its own CPU is its
    thread time less the CPU inside counted calls (the ledger has it) and in its waits."""

    def __init__(self, thread: threading.Thread, ledger: Ledger):
        self.thread, self.ledger, self.ident = thread, ledger, thread.ident
        self.in_call, self.call_started, self.woken, self.calls = 0, 0.0, False, 0
        self.debt, self.charged, self.wait_cpu = 0.0, 0.0, 0.0
        self.cpu_start: float | None = None  # set from the thread itself, at its first call

    def start(self) -> None:
        if self.cpu_start is None:
            self.cpu_start, self.ledger_start = time.thread_time(), self.ledger.thread_cpu.get(self.ident, 0.0)

    def own_cpu(self) -> float:
        """Own CPU so far (call from the thread itself)."""
        now = time.thread_time()
        inside = self.ledger.thread_cpu.get(self.ident, 0.0) - self.ledger_start
        current = now - self.call_started if self.in_call else 0.0  # the call under way, not in the ledger yet
        return now - self.cpu_start - inside - self.wait_cpu - current


class World:
    """The clock, and the thread that moves it and wakes each simulated component at its events."""

    def __init__(self, scale: float, ledger: Ledger, call_s: float = 0.0, dispatch_s: float = 0.0,
                 charge_cpu: bool = True):  # fmt: skip
        self.scale, self.ledger = scale, ledger
        self.call_s, self.dispatch_s, self.charge_cpu = call_s, dispatch_s, charge_cpu
        self.lock = threading.RLock()  # the clock and everything the simulated components hold
        self._cv = threading.Condition(self.lock)
        self._t = 0.0
        self.accounts: dict[int, _Account] = {}
        self.finished: dict[str, tuple[float, int]] = {}  # thread name -> (own CPU s, remote calls)
        self.names: dict[int, str] = {}
        self._busy: set[int] = {-1}  # controller threads computing, or woken and not running yet (-1: set-up)
        self._deadlines: dict[int, float] = {}  # waiting threads -> when they wake at the latest
        self._put_waiters: set[int] = set()  # waiting threads a group reaching the buffer wakes
        self._events: list = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-events", daemon=True)
        self.running = False  # the set-up's calls are neither charged nor timed
        self.event_cpu_s = 0.0
        self.error: BaseException | None = None  # what stopped the event thread, if it failed
        self.broadcast = None  # the weight broadcast engines join next (sim_components.Broadcast)

    def now(self) -> float:
        return self._t

    # -- controller threads ----------------------------------------------------------------------

    def enlist(self, thread: threading.Thread | None = None) -> _Account | None:
        """A thread of the controller's (the caller, or `thread` just started): time stops while
        it computes."""
        ident = thread.ident if thread is not None else threading.get_ident()
        account = self.accounts.get(ident)
        if account is None and self.running and ident != self._thread.ident:
            with self.lock:
                account = self.accounts[ident] = _Account(thread or threading.current_thread(), self.ledger)
                self.names[ident] = account.thread.name
                self._busy.add(ident)
        if account is not None and thread is None:
            account.start()
        return account

    def discharge(self, ident: int) -> None:
        """The thread's part in the run is over: keep what it computed (a thread that has ended
        is counted up to its last wait)."""
        with self.lock:
            account = self.accounts.pop(ident, None)
            if account is not None and account.cpu_start is not None:
                own = account.own_cpu() if ident == threading.get_ident() else account.charged
                self.finished[account.thread.name] = (own, account.calls)
            self._busy.discard(ident)
            self._cv.notify_all()

    def charge(self, account: _Account, kind: str) -> None:
        account.calls += 1
        account.debt += self.dispatch_s if kind in DISPATCHED else self.call_s
        if account.debt >= PAY_EVERY_S and not account.in_call:
            self.pay()

    def pay(self) -> None:
        """Wait off what the calling thread owes: its CPU since it last paid, and its round trips."""
        account = self.accounts.get(threading.get_ident())
        if account is None:
            return
        own = account.own_cpu()
        if self.charge_cpu:
            account.debt += own - account.charged
        account.charged = own
        debt, account.debt = account.debt, 0.0
        if debt > 0:
            self._wait(account, self._t + debt, on_put=False)

    def sleep_until(self, t: float) -> None:
        self.pay()
        account = self.accounts.get(threading.get_ident())
        if account is not None and t > self._t:
            self._wait(account, t, on_put=False)

    def sleep(self, seconds: float) -> None:
        self.enlist()
        self.sleep_until(self._t + seconds)

    def wait_for_put(self, deadline: float) -> None:
        """Until a group reaches the buffer or the deadline, whichever comes first."""
        self.pay()
        account = self.accounts.get(threading.get_ident())
        if account is not None and deadline > self._t:
            self._wait(account, deadline, on_put=True)

    @contextlib.contextmanager
    def passive(self) -> Iterator[None]:
        """The calling thread waits for another controller thread (not for the clock)."""
        self.pay()
        me = threading.get_ident()
        with self.lock:
            self._busy.discard(me)
            self._cv.notify_all()
        try:
            yield
        finally:
            with self.lock:
                if me in self.accounts:
                    self._busy.add(me)

    def _wait(self, account: _Account, deadline: float, on_put: bool) -> None:
        entered = time.thread_time()
        with self._cv:
            me = account.ident
            self._deadlines[me], account.woken = deadline, False
            if on_put:
                self._put_waiters.add(me)
            self._busy.discard(me)
            self._cv.notify_all()
            while not account.woken:
                self._cv.wait(1.0)
                if self.error is not None:
                    raise RuntimeError("the simulation's event thread failed") from self.error
            del self._deadlines[me]
            self._put_waiters.discard(me)
        if not account.in_call:  # a wait inside a call is in the call's (the ledger's) time
            account.wait_cpu += time.thread_time() - entered

    def _wake(self, ident: int) -> None:
        """Mark a waiting thread running before it runs (caller holds the lock): the clock waits for it."""
        account = self.accounts.get(ident)
        if account is not None and not account.woken:
            account.woken = True
            self._busy.add(ident)
            self._cv.notify_all()

    def group_arrived(self) -> None:
        """A group reached the buffer (caller holds the lock)."""
        for ident in list(self._put_waiters):
            self._wake(ident)

    # -- events ------------------------------------------------------------------------------

    def schedule(self, t: float, component) -> None:
        """Call component.advance(now) once the clock reaches t (caller holds the lock)."""
        heapq.heappush(self._events, (t, next(self._order), component.stamp, component))

    def start(self) -> None:
        self.running = True
        self._thread.start()
        with self.lock:
            self._busy.discard(-1)
            self._cv.notify_all()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.running = False

    def _next(self) -> float:
        t = min(self._deadlines.values(), default=math.inf)
        return min(t, self._events[0][0]) if self._events else t

    def _run(self) -> None:
        started = time.thread_time()
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - raised in the waiting controller threads
            with self._cv:
                self.error = err
                self._cv.notify_all()
        self.event_cpu_s = time.thread_time() - started

    def _loop(self) -> None:
        paced_from = (0.0, time.perf_counter())
        with self._cv:
            while not self._stop.is_set():
                for ident in [i for i, a in self.accounts.items() if not a.thread.is_alive()]:
                    self.discharge(ident)  # a feeder that ended
                t = self._next()
                if self._busy or t == math.inf:
                    self._cv.wait(0.01)
                    paced_from = (self._t, time.perf_counter())
                    continue
                if self.scale:  # never faster than `scale` simulated seconds per real second
                    ahead = (t - paced_from[0]) / self.scale - (time.perf_counter() - paced_from[1])
                    if ahead > 0:
                        self._cv.wait(ahead)
                        continue  # someone may have woken meanwhile; look again
                self._t = max(self._t, t)
                while self._events and self._events[0][0] <= self._t:
                    _, _, stamp, component = heapq.heappop(self._events)
                    if stamp == component.stamp:  # else it changed since, and scheduled itself again
                        component.advance(self._t)
                for ident, deadline in list(self._deadlines.items()):
                    if deadline <= self._t:
                        self._wake(ident)


class SimPending:
    """A call whose result comes at a simulated time (a broadcast's end)."""

    def __init__(self, world: World, ready: threading.Event, end: list[float], value=None):
        self.world, self.ready, self.end, self.value = world, ready, end, value

    def result(self, timeout: float | None = None):
        self.ready.wait()  # set by the broadcast, which the caller starts before it asks
        self.world.sleep_until(self.end[0])
        return self.value


class _SimTime:
    """What the controller's modules see as `time`."""

    def __init__(self, world: World):
        self.world = world

    def perf_counter(self) -> float:
        return self.world.now()

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)


@contextlib.contextmanager
def scaled_clock(world: World) -> Iterator[None]:
    """Run the controller on the world's clock, from the calling (the loop's) thread."""
    modules = (controller, sources, weight_publisher)
    saved = [m.time for m in modules]
    for m in modules:
        m.time = _SimTime(world)
    world.start()
    world.enlist()
    try:
        yield
    finally:
        for m, t in zip(modules, saved, strict=True):
            m.time = t
        world.discharge(threading.get_ident())
        world.stop()


class _Probe:
    def __init__(self, world: World, ledger: Ledger):
        self.world, self.ledger = world, ledger

    @remote("probe")
    def nothing(self) -> None:
        pass


def call_overhead_s(calls: int = 20000) -> float:
    """CPU a counted call adds in the caller's thread outside what it measures (the timing,
    counting and charging itself): subtracted from the controller's own CPU."""
    ledger = Ledger()
    world = World(0.0, ledger, charge_cpu=False)
    probe = _Probe(world, ledger)
    world.running = True  # counted and charged as in a run, without the event thread
    world.enlist()
    before = time.thread_time()
    for _ in range(calls):
        probe.nothing()
    spent = time.thread_time() - before - ledger.cpu["probe"]
    world.discharge(threading.get_ident())
    return max(0.0, spent / calls)
