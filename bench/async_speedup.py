"""Sync vs async on the same workload, with the response lengths of reasoning RL.

    python -m bench.async_speedup [--model tiny|smollm2-135m] [--steps 12] [--groups 8] [--n 8]

Reasoning rollouts are long-tailed: most responses are short, a few run to the cap, and a
synchronous step waits for the longest one while the learner idles. This bench imposes such a
law on the engine (vLLM's per-request min_tokens = max_tokens, `rollout.imposed_median_tokens`):
lengths are log-normal (median `--median-tokens`, log-space spread `--sigma`), clipped at
`--max-new-tokens`. It is a throughput workload: the tokens are sampled, the rewards real, but
the lengths are the bench's, not the model's.

From one run (sync first, then async, each after its own start-up, which is excluded):
- sync T_gen and T_train per step (the clocks of a sync run, where the two never overlap);
- the ideal speedup of perfect overlap, (T_gen + T_train) / max(T_gen, T_train);
- the achieved sync/async wall-time ratio, and the share of the ideal it reaches;
- the learner's idle share in both modes (1 - time in train steps / loop wall time).
Engines and learner ranks get their own cores (train.pin_cores); `--no-pin` lets
them share every core, to show what pinning buys.
"""

from __future__ import annotations

import argparse
import tempfile

from vespo import run_config
from vespo.train import run

# the default workload keeps generation and training comparable (ideal ~1.8x here): a workload
# where one side dwarfs the other shows nothing about overlap
DEFAULTS = {
    "tiny": dict(groups=8, n=8, max_new_tokens=256, median_tokens=48, micro_batch_tokens=1024),
    "smollm2-135m": dict(groups=2, n=4, max_new_tokens=96, median_tokens=24, micro_batch_tokens=1024),
}


def overrides(mode: str, args, out: str) -> list[str]:
    prompt_room = 64 if args.model == "tiny" else 256
    keys = [
        f"model={args.model}", f"train.mode={mode}", f"train.steps={args.steps}",
        f"train.groups_per_step={args.groups}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.max_model_len={args.max_new_tokens + prompt_room}", f"rollout.max_num_seqs={args.inflight * args.n}",
        f"rollout.imposed_median_tokens={args.median_tokens}", f"rollout.imposed_length_sigma={args.sigma}",
        "train.eval_every=0", f"buffer.max_staleness={args.max_staleness}",
        f"train.max_inflight_groups={args.inflight}", f"train.output_dir={out}/{mode}", "wandb.mode=disabled",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}", f"train.pin_cores={str(not args.no_pin).lower()}",
    ]  # fmt: skip
    if args.model != "tiny":
        keys += ["task.name=word_problems", "learner.lr=1e-6"]
    return keys + args.set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(DEFAULTS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--n", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--median-tokens", type=int)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--micro-batch-tokens", type=int)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--inflight", type=int, help="groups in flight at once in async mode (default 4 steps' worth)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides (both modes)")
    parser.add_argument("--no-pin", action="store_true", help="engines and learner share every core")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.inflight = args.inflight or 4 * args.groups
    print(f"workload: {args.model}, {args.steps} steps of {args.groups} prompts x {args.n}; response lengths imposed "
          f"(min_tokens = max_tokens): log-normal, median {args.median_tokens}, sigma {args.sigma}, "
          f"cap {args.max_new_tokens}", flush=True)  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("sync", "async"):
            results[mode] = run(run_config.load(None, overrides(mode, args, out)))
    report(results)


def report(results: dict) -> None:
    sync, asyn = results["sync"], results["async"]
    print(f"\ncores: {asyn.cores or 'not pinned'}")
    print(f"{'mode':<6} {'steps':>5} {'wall s':>8} {'s/step':>7} {'gen s/step':>10} {'train s/step':>12} "
          f"{'learner idle':>13} {'max staleness':>14}")  # fmt: skip
    for mode, s in results.items():
        gen, train = s.clock.get("generate", 0.0) / s.steps, s.clock["train"] / s.steps
        print(f"{mode:<6} {s.steps:>5} {s.wall_s:>8.1f} {s.wall_s / s.steps:>7.2f} {gen:>10.2f} {train:>12.2f} "
              f"{1 - s.learner_busy_fraction:>13.1%} {s.max_batch_staleness:>14}")  # fmt: skip
    t_gen, t_train = sync.clock["generate"] / sync.steps, sync.clock["train"] / sync.steps
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    achieved = sync.wall_s / asyn.wall_s
    broadcast = sync.clock.get("sync", 0) / sync.steps
    print(f"sync: T_gen {t_gen:.2f}s + T_train {t_train:.2f}s per step (+ {broadcast:.2f}s weight broadcast); "
          f"ideal overlap (T_gen + T_train) / max = {ideal:.2f}x")  # fmt: skip
    print(
        f"async speedup {achieved:.2f}x of ideal {ideal:.2f}x ({achieved / ideal:.0%} of ideal), "
        f"learner idle {1 - asyn.learner_busy_fraction:.0%}"
    )


if __name__ == "__main__":
    main()
