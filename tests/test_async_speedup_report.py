"""bench.async_speedup's steady-state arithmetic: the first steps (compilation, first batch
shapes) are left out of every figure, in both modes alike."""

from __future__ import annotations

from types import SimpleNamespace

from bench.async_speedup import pooled, report, window


def summary(step_s: float, first_s: float, train_s: float, gen_s: float, steps: int = 6):
    """A run whose first step takes `first_s` and every later one `step_s`, of which `train_s`
    is training and `gen_s` waiting for generation."""
    marks, wall, train, gen = [], 0.0, 0.0, 0.0
    for k in range(steps):
        wall += first_s if k == 0 else step_s
        train += (first_s - gen_s) if k == 0 else train_s
        gen += gen_s
        marks.append({"wall": wall, "train": train, "generate": gen, "wait": 0.0, "sync": 0.01 * (k + 1)})
    return SimpleNamespace(step_clocks=marks, wall_s=wall, steps=steps, cores={}, max_batch_staleness=0)


def test_the_window_starts_after_the_warm_up_steps():
    run = summary(step_s=2.0, first_s=10.0, train_s=1.5, gen_s=0.5)
    assert window(run, 0)["wall"] == 20.0 and window(run, 0)["steps"] == 6
    w = window(run, 1)
    assert w["wall"] == 10.0 and w["train"] == 7.5 and w["generate"] == 2.5 and w["steps"] == 5


def test_the_report_is_steady_state_and_ends_with_the_checked_line(capsys):
    # sync: 1.0 s generation + 1.0 s training a step; async: 1.25 s a step, all of it training but 0.25
    results = {"sync": [summary(step_s=2.0, first_s=12.0, train_s=1.0, gen_s=1.0)],
               "async": [summary(step_s=1.25, first_s=11.0, train_s=1.0, gen_s=0.0)]}  # fmt: skip
    report(results, warmup=1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # the whole loops (22 s vs 17.25 s) would say 1.28x; the steady state is 2.0 / 1.25
    assert last == "async speedup 1.60x of ideal 2.00x (80% of ideal), learner idle 20%"


def test_rounds_are_pooled_step_for_step_not_averaged_as_ratios(capsys):
    # round 2 ran on a slower machine: 4 s sync steps against 2.5 s async ones (1.6x again)
    slow = {"sync": summary(step_s=4.0, first_s=12.0, train_s=2.0, gen_s=2.0),
            "async": summary(step_s=2.5, first_s=11.0, train_s=2.0, gen_s=0.0)}  # fmt: skip
    fast = {"sync": summary(step_s=2.0, first_s=12.0, train_s=1.0, gen_s=1.0),
            "async": summary(step_s=1.25, first_s=11.0, train_s=1.0, gen_s=0.0)}  # fmt: skip
    both = pooled([fast["sync"], slow["sync"]], 1)
    assert both["steps"] == 10 and both["wall"] == 30.0 and both["train"] == 15.0
    report({mode: [fast[mode], slow[mode]] for mode in fast}, warmup=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == 2
    assert lines[-1] == "async speedup 1.60x of ideal 2.00x (80% of ideal), learner idle 20%"
