"""Soak: async training for a long stretch with the engine killed every few minutes.

Reports what the reliability guarantees are about: prompts lost (handed out, never trained
and not on their way at the end) and groups trained twice, both of which must be 0, and the
throughput retained: trained samples per second over the whole soak divided by the rate
outside the recovery windows (kill to engine back), the same run's estimate of its rate with
no kills. The rate before the first kill is also reported, but it includes the run's ramp-up.
Each kill costs one Ray restart plus a vLLM start-up during which the only engine generates
nothing, so what is retained depends on how often it is killed.

    python -m bench.soak                        # 30 min, a kill every 4 min (the recorded run)
    python -m bench.soak --minutes 5 --kill-every 90
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass


@dataclass
class SoakReport:
    minutes: float
    kills: int
    engine_restarts: int
    steps: int
    trained_groups: int
    trained_samples: int
    lost_groups: int
    duplicated_groups: int
    requeued_groups: int
    samples_per_s_before_first_kill: float
    samples_per_s_overall: float
    samples_per_s_outside_recovery: float
    samples_per_s_during_recovery: float
    throughput_retained: float
    recovery_s: list[float]
    steps_during_recovery: list[int]
    # first tenth of the steps vs last tenth: the run's own dynamics (longer responses cost
    # more per step), told apart from a slowdown of the system
    response_length_first_last: tuple[float, float] = (0.0, 0.0)
    learner_s_per_step_first_last: tuple[float, float] = (0.0, 0.0)
    steps_per_s_first_last: tuple[float, float] = (0.0, 0.0)


class StepTrace:
    """The controller's metrics sink for the soak: keeps per step the time, the mean response
    length and the learner's cumulative train seconds (wandb stays off)."""

    location = ""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, float, float]] = []

    def log(self, metrics: dict[str, float], step: int, histograms: dict | None = None) -> None:
        self.rows.append((time.monotonic(), step, metrics.get("response/length_mean", 0.0),
                          metrics.get("time/train_s", 0.0)))  # fmt: skip

    def first_last(self) -> dict[str, tuple[float, float]]:
        tenth = len(self.rows) // 10
        if tenth < 2:
            return {}
        first, last = self._summary(self.rows[:tenth]), self._summary(self.rows[-tenth:])
        keys = ("response_length_first_last", "learner_s_per_step_first_last", "steps_per_s_first_last")
        return {key: (a, b) for key, a, b in zip(keys, first, last, strict=True)}

    @staticmethod
    def _summary(rows: list[tuple[float, int, float, float]]) -> tuple[float, float, float]:
        """Mean response length, learner seconds per step and steps per second over rows."""
        (t0, s0, _, c0), (t1, s1, _, c1) = rows[0], rows[-1]
        length = round(sum(r[2] for r in rows) / len(rows), 2)
        return length, round((c1 - c0) / max(s1 - s0, 1), 4), round((s1 - s0) / max(t1 - t0, 1e-9), 2)


def record_handouts(controller) -> set[str]:
    """Every group id the fleet hands to an engine from now on, failed ones included: with the
    trained and pending ids it shows that no prompt was lost."""
    handed_out: set[str] = set()
    for engine in controller.engines:
        submit = engine.submit

        def recording(items, submit=submit):
            handed_out.update(i.group_id for i in items)
            return submit(items)

        engine.submit = recording
    return handed_out


def pending_groups(controller, handed_out: set[str]) -> set[str]:
    """Groups handed out and not lost: in flight in an engine, waiting to be handed out again,
    or received by the buffer (waiting there, or dropped as too stale, which it counts)."""
    delivered = set(controller.buffer.seen_groups(sorted(handed_out)))
    return set(controller.fleet.held) | {gid for gid, _ in controller.prompts.requeued} | delivered


def soak(minutes: float, kill_every_s: float, overrides: list[str] | None = None) -> SoakReport:
    import ray

    from vespo.config import run_config
    from vespo.orchestration.controller import Controller

    base = ["train.steps=1000000", "train.eval_every=0", "wandb.mode=disabled", "rollout.max_restarts=1000",
            "train.output_dir=runs/soak"]  # fmt: skip
    cfg = run_config.load(None, [*base, *(overrides or [])])
    samples_per_step = cfg.train.groups_per_step * cfg.rollout.n
    trace = StepTrace()
    controller = Controller(cfg, trace)  # type: ignore[arg-type]  # a metrics sink like RunLogger
    marks: list[tuple[float, int]] = []  # (time, learner step) at every kill and at the end
    recovery: list[float] = []
    recovery_steps: list[int] = []  # learner steps made while the engine was down
    try:
        controller.setup()
        handed = record_handouts(controller)
        started = time.monotonic()

        def chaos():
            next_kill = started + kill_every_s
            while time.monotonic() < started + minutes * 60 and controller.stop_reason is None:
                if time.monotonic() >= next_kill:
                    marks.append((time.monotonic(), controller.step))
                    restarts = controller.engine_restarts
                    ray.kill(controller.engines[0].actor, no_restart=False)
                    t0 = time.monotonic()
                    while controller.engine_restarts == restarts and controller.stop_reason is None:
                        time.sleep(0.2)
                    recovery.append(round(time.monotonic() - t0, 1))
                    recovery_steps.append(controller.step - marks[-1][1])
                    print(f"kill {len(marks)} at step {marks[-1][1]}: engine back in {recovery[-1]:.0f}s, "
                          f"{recovery_steps[-1]} steps meanwhile", flush=True)  # fmt: skip
                    next_kill = time.monotonic() + kill_every_s
                time.sleep(0.2)
            controller.request_stop("soak time is up")

        threading.Thread(target=chaos, name="soak-chaos", daemon=True).start()
        summary = controller.run(checkpoint=False)
        ended = time.monotonic()
        pending = pending_groups(controller, handed)
    finally:
        controller.shutdown()
        ray.shutdown()
    trained = summary.trained_groups
    first_kill_t, first_kill_step = marks[0] if marks else (ended, summary.steps)
    before = first_kill_step * samples_per_step / max(first_kill_t - started, 1e-9)
    overall = summary.steps * samples_per_step / max(ended - started, 1e-9)
    down_s, down_steps = sum(recovery), sum(recovery_steps)
    outside = (summary.steps - down_steps) * samples_per_step / max(ended - started - down_s, 1e-9)
    during = down_steps * samples_per_step / down_s if down_s else 0.0
    return SoakReport(
        minutes=round((ended - started) / 60, 1), kills=len(marks), engine_restarts=summary.engine_restarts,
        steps=summary.steps, trained_groups=len(set(trained)), trained_samples=summary.steps * samples_per_step,
        lost_groups=len(handed - set(trained) - pending), duplicated_groups=len(trained) - len(set(trained)),
        requeued_groups=len(summary.requeued_groups), samples_per_s_before_first_kill=round(before, 1),
        samples_per_s_overall=round(overall, 1), samples_per_s_outside_recovery=round(outside, 1),
        samples_per_s_during_recovery=round(during, 1),
        throughput_retained=round(overall / outside, 3) if outside else 0.0,
        recovery_s=recovery, steps_during_recovery=recovery_steps, **trace.first_last(),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every", type=float, default=240.0, help="seconds between engine kills")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.groups_per_step=16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    report = soak(args.minutes, args.kill_every, args.overrides)
    print(json.dumps(asdict(report), indent=1))


if __name__ == "__main__":
    main()
