"""Sync vs async on the same workload: the same learner steps, the same prompts per step.

    python -m bench.async_speedup [--steps 20] [--groups 16] [--n 8] [--max-new-tokens 32]

Prints each mode's wall time for the training loop (set-up excluded), the learner's idle
fraction (1 - time in train steps / loop wall time) and the sync/async wall-time ratio.
Both runs happen in this one process, one after the other (machines are noisy: compare
ratios from one run).
"""

from __future__ import annotations

import argparse
import tempfile

from vespo import run_config
from vespo.train import run


def one(mode: str, args, out: str):
    cfg = run_config.load(None, [
        f"train.mode={mode}", f"train.steps={args.steps}", f"train.groups_per_step={args.groups}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}", "train.eval_every=0",
        f"buffer.max_staleness={args.max_staleness}", f"train.max_inflight_groups={2 * args.groups}",
        f"train.output_dir={out}/{mode}", "wandb.mode=disabled", f"learner.zero_stage={args.zero_stage}",
        f"learner.world_size={args.world_size}",
    ])  # fmt: skip
    return run(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-staleness", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("sync", "async"):
            results[mode] = one(mode, args, out)
    print(f"\n{'mode':<6} {'steps':>5} {'wall s':>8} {'train s':>8} {'learner idle':>13} {'reward first->last':>20}")
    for mode, s in results.items():
        k = max(1, len(s.rewards) // 4)
        first, last = sum(s.rewards[:k]) / k, sum(s.rewards[-k:]) / k
        print(f"{mode:<6} {s.steps:>5} {s.wall_s:>8.1f} {s.clock['train']:>8.1f} {1 - s.learner_busy_fraction:>13.1%} "
              f"{first:>9.3f} -> {last:.3f}")  # fmt: skip
    ratio = results["sync"].wall_s / results["async"].wall_s
    print(
        f"\nsync/async wall-time ratio: {ratio:.2f}x (async max batch staleness {results['async'].max_batch_staleness})"
    )


if __name__ == "__main__":
    main()
