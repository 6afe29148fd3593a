"""Sync vs async on the same workload, with the response lengths of reasoning RL.

    python -m bench.async_speedup [--model tiny|smollm2-135m] [--steps 12] [--groups 8] [--n 8]
    python -m bench.async_speedup --config deploy/configs/agent_products.yaml  # episodes, as the model plays them

Reasoning rollouts are long-tailed: most responses are short, a few run to the cap, and a
synchronous step waits for the longest one while the learner idles. This bench imposes such a
law on the engine (vLLM's per-request min_tokens = max_tokens, `rollout.imposed_median_tokens`):
lengths are log-normal (median `--median-tokens`, log-space spread `--sigma`), clipped at
`--max-new-tokens`. It is a throughput workload: the tokens are sampled, the rewards real, but
the lengths are the bench's, not the model's.

From one run: the actors start once, then `--rounds` (default 3) pairs of training runs
alternate on them, sync then async (each a fresh learner, buffer and prompt stream:
`Controller.begin_run`), so that a drift of the machine's speed hits both modes alike. Pooled
over the rounds:
- sync T_gen and T_train per step (the clocks of a sync run, where the two never overlap);
- the ideal speedup of perfect overlap, (T_gen + T_train) / max(T_gen, T_train);
- the achieved sync/async wall-time ratio, and the share of the ideal it reaches;
- the learner's idle share in both modes (1 - time in train steps / loop wall time).
All of them are steady-state: measured from the end of step `--warmup` (default 2) to the last
step, because the first steps pay one-off costs that a long run does not (the learner's first
forward and backward compile kernels, vLLM meets its first batch shapes), in both modes alike.
The whole-loop figures are printed too.
`--config` runs a run config's own workload instead (multi-turn episodes, say), with nothing
imposed: lengths, turns and tool calls are whatever the model and the environment make them.
Engines and learner ranks get their own cores (train.pin_cores); `--no-pin` lets
them share every core, to show what pinning buys.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict

from rollout.tasks import arithmetic
from vespo.config import run_config

# The default workload keeps generation and training comparable: a workload where one side dwarfs
# the other shows nothing about overlap. The tiny model's decode costs vLLM about six times what a
# learner step costs per token (per-sequence overhead dominates a 2-layer model), so its prompts
# carry an instruction preamble, as reasoning-RL prompts do (DAPO's template, a system turn): the
# learner trains on prompt + response, the engine prefills the prompt once per group.
# smollm2-135m: a learner step on one core costs about four times the generation of its data at
# a cap of 96 tokens (ideal 1.27x), so its learner runs in bf16 (1.7x faster on this CPU,
# bench/dtype.py) and its tail reaches further (cap 192, sigma 1.3): an ideal of about 1.7x.
DEFAULTS = {
    "tiny": dict(groups=8, n=8, max_new_tokens=128, median_tokens=32, sigma=1.0, prompt_chars=300),
    "smollm2-135m": dict(groups=2, n=4, max_new_tokens=192, median_tokens=24, sigma=1.3, prompt_chars=200),
}
MODEL_KEYS = {"tiny": [], "smollm2-135m": ["learner.lr=1e-6", "learner.bf16=true"]}
PREAMBLE = (
    "Solve the problem below. Work step by step, check every step, and keep the reasoning short "
    "enough to read. When you are sure, write the final answer as a number on its own line. "
)


def prompts_file(out: str, chars: int) -> str:
    """Arithmetic problems behind a preamble of `chars` characters, as rows of the math task."""
    preamble = (PREAMBLE * (1 + chars // len(PREAMBLE)))[:chars]
    path = f"{out}/prompts.jsonl"
    with open(path, "w") as f:
        for p in arithmetic.problems(2048, seed=0, max_digits=1):
            f.write(json.dumps({"prompt": preamble + p.prompt, "answer": p.answer}) + "\n")
    return path


def overrides(mode: str, args, out: str) -> list[str]:
    if args.config:  # the config's workload as it is; only the mode and the measurement's settings
        return [
            f"train.mode={mode}", f"train.steps={args.steps}", f"train.groups_per_step={args.groups}",
            f"rollout.n={args.n}", "train.eval_every=0", f"buffer.max_staleness={args.max_staleness}",
            f"train.max_inflight_groups={args.inflight}", f"train.output_dir={out}/{mode}", "wandb.mode=disabled",
            f"train.pin_cores={str(not args.no_pin).lower()}", *args.set, *(args.async_set if mode == "async" else []),
        ]  # fmt: skip
    prompt_room = 64 + args.prompt_chars if args.model == "tiny" else 256
    keys = [
        f"model={args.model}", f"train.mode={mode}", f"train.steps={args.steps}",
        f"train.groups_per_step={args.groups}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.max_model_len={args.max_new_tokens + prompt_room}", f"rollout.max_num_seqs={args.inflight * args.n}",
        f"rollout.imposed_median_tokens={args.median_tokens}", f"rollout.imposed_length_sigma={args.sigma}",
        "train.eval_every=0", f"buffer.max_staleness={args.max_staleness}",
        f"train.max_inflight_groups={args.inflight}", f"train.output_dir={out}/{mode}", "wandb.mode=disabled",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}", f"train.pin_cores={str(not args.no_pin).lower()}",
    ]  # fmt: skip
    if args.prompt_chars:
        keys += ["task.name=math", f"task.path={prompts_file(out, args.prompt_chars)}",
                 "task.reward_fn=rollout.tasks.arithmetic:reward"]  # fmt: skip
    keys += MODEL_KEYS[args.model]
    return keys + args.set + (args.async_set if mode == "async" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(DEFAULTS))
    parser.add_argument("--config", help="a run config whose own workload to time (--model and lengths ignored)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--n", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--median-tokens", type=int)
    parser.add_argument("--sigma", type=float)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--prompt-chars", type=int, help="instruction preamble before each arithmetic problem")
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--inflight", type=int, help="groups in flight at once in async mode (default 2 steps' worth)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides (both modes)")
    parser.add_argument("--async-set", nargs="*", default=[], metavar="KEY=VALUE", help="async run only")
    parser.add_argument("--no-pin", action="store_true", help="engines and learner share every core")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady-state figures")
    parser.add_argument("--rounds", type=int, default=3, help="sync/async pairs, alternating on the same actors")
    args = parser.parse_args()
    if args.config:
        base = run_config.load(args.config)
        args.groups, args.n = args.groups or base.train.groups_per_step, args.n or base.rollout.n
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.inflight = args.inflight or 2 * args.groups
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.config:
        print(f"workload: {args.config} as configured, {args.steps} steps of {args.groups} prompts x {args.n}")
    else:
        print(f"workload: {args.model}, {args.steps} steps of {args.groups} prompts x {args.n}; response lengths "
              f"imposed (min_tokens = max_tokens): log-normal, median {args.median_tokens}, sigma {args.sigma}, cap "
              f"{args.max_new_tokens}; prompts: a {args.prompt_chars}-character preamble + the problem",
              flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        results = alternate(args, out)
    report(results, args.warmup)


def alternate(args, out: str) -> dict[str, list]:
    """`args.rounds` sync/async pairs of runs on one set of actors; each mode's RunSummaries."""
    import ray
    from rich.console import Console

    import configtypes
    from vespo.orchestration.controller import Controller
    from vespo.reporting.run_logger import RunLogger

    console, results, controller = Console(), defaultdict(list), None
    was_up = ray.is_initialized()
    try:
        for r in range(args.rounds):
            for mode in ("sync", "async"):
                cfg = run_config.load(args.config, overrides(mode, args, out))
                logger = RunLogger(cfg.wandb, configtypes.to_dict(cfg), console, total_steps=cfg.train.steps)
                if controller is None:
                    controller = Controller(cfg, logger)
                    controller.setup()
                console.print(f"round {r + 1}/{args.rounds}: {mode} run")
                controller.begin_run(cfg, logger)
                try:
                    results[mode].append(controller.run(checkpoint=False))
                finally:
                    logger.finish()
    finally:
        if controller is not None:
            controller.shutdown()
        if not was_up and ray.is_initialized():
            ray.shutdown()
    return results


def window(summary, warmup: int) -> dict[str, float]:
    """Seconds spent from the end of step `warmup` to the end of the run, by clock ("wall": the
    loop's), and the number of steps in between."""
    marks = summary.step_clocks
    first = marks[warmup - 1] if warmup else {k: 0.0 for k in marks[-1]}
    spent = {k: marks[-1][k] - first.get(k, 0.0) for k in marks[-1]}
    return {**spent, "steps": len(marks) - warmup}


def pooled(runs: list, warmup: int) -> dict[str, float]:
    """The steady-state windows of several runs of one mode, added up."""
    total: dict[str, float] = defaultdict(float)
    for run in runs:
        for key, value in window(run, warmup).items():
            total[key] += value
    return dict(total)


def figures(sync: dict[str, float], asyn: dict[str, float]) -> dict[str, float]:
    """T_gen, T_train (sync, per step), the ideal and the achieved speedup, async learner idle."""
    t_gen, t_train = sync["generate"] / sync["steps"], sync["train"] / sync["steps"]
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    achieved = (sync["wall"] / sync["steps"]) / (asyn["wall"] / asyn["steps"])
    return {"t_gen": t_gen, "t_train": t_train, "ideal": ideal, "achieved": achieved,
            "idle": 1 - asyn["train"] / asyn["wall"]}  # fmt: skip


def report(results: dict[str, list], warmup: int) -> None:
    print(f"\ncores: {results['async'][0].cores or 'not pinned'}")
    print(f"steady state: from the end of step {warmup} of each run")
    for r, (sync, asyn) in enumerate(zip(results["sync"], results["async"], strict=True)):
        f = figures(window(sync, warmup), window(asyn, warmup))
        print(f"round {r + 1}: async {f['achieved']:.2f}x of ideal {f['ideal']:.2f}x ({f['achieved'] / f['ideal']:.0%})"
              f", learner idle {f['idle']:.0%}; whole loops: sync {sync.wall_s:.1f}s, async {asyn.wall_s:.1f}s "
              f"for {sync.steps} steps")  # fmt: skip
    print(f"{'pooled':<6} {'steps':>5} {'wall s':>8} {'s/step':>7} {'gen s/step':>10} {'train s/step':>12} "
          f"{'learner idle':>13} {'max staleness':>14}")  # fmt: skip
    spans = {mode: pooled(runs, warmup) for mode, runs in results.items()}
    for mode, w in spans.items():
        steps, stale = w["steps"], max(s.max_batch_staleness for s in results[mode])
        print(f"{mode:<6} {steps:>5.0f} {w['wall']:>8.1f} {w['wall'] / steps:>7.2f} {w['generate'] / steps:>10.2f} "
              f"{w['train'] / steps:>12.2f} {1 - w['train'] / w['wall']:>13.1%} {stale:>14}")  # fmt: skip
    f = figures(spans["sync"], spans["async"])
    broadcast = spans["sync"]["sync"] / spans["sync"]["steps"]
    print(f"sync: T_gen {f['t_gen']:.2f}s + T_train {f['t_train']:.2f}s per step (+ {broadcast:.2f}s weight "
          f"broadcast); ideal overlap (T_gen + T_train) / max = {f['ideal']:.2f}x")  # fmt: skip
    print(
        f"async speedup {f['achieved']:.2f}x of ideal {f['ideal']:.2f}x ({f['achieved'] / f['ideal']:.0%} of ideal), "
        f"learner idle {f['idle']:.0%}"
    )


if __name__ == "__main__":
    main()
