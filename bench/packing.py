"""Learner tokens/s with sequence packing against the padded path, on lengths that vary 10x.

One in-process LearnerWorker (world size 1, ZeRO 0, fp32, CPU) on a random-init Llama of
~13M parameters (head_dim 64) trains on one batch per workload, switching
`learner.pack_sequences` between steps; rounds interleave the two so machine load hits both
alike. Tokens/s counts the batch's real tokens (prompt + response) over the time of the
mode's steps: wall clock of forward + objective + backward, and the CPU time of the process,
which a shared machine's other load barely inflates (the last line leads with it). One torch
thread by default: on a small shared machine a second thread spends its time waiting for the
other at every op, which makes both clocks noisy. Padding is the share of computed positions
that hold no token. Lengths run 100..1000 tokens: by default a long-tailed draw (most
responses short, a few near the cap, as RL responses are); `--workloads uniform,long-tailed`
adds uniform lengths, where the padded path's length-sorted micro-batches already waste
little. The last line is the last workload's ratio.
Run: .venv/bin/python -m bench.packing [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.learner import random_rows
from buffer.trajectory import Trajectory
from learner.batching import collate
from learner.config import LearnerConfig
from learner.sharding import batch_totals

MODEL = dict(
    vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6, head_dim=64
)
PROMPT = 64  # prompt tokens of every sequence; the response makes up the rest


def save_model(path: Path) -> tuple[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, num_key_value_heads=MODEL["num_attention_heads"], max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return str(path), sum(p.numel() for p in model.parameters())


def lengths(kind: str, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "long-tailed":  # Pareto(1.5) tail above 100, capped at 1000
        return np.minimum(1000, 100 * (1 + rng.pareto(1.5, rows))).astype(int)
    return rng.integers(100, 1001, rows)


def trajectories(total: np.ndarray, vocab: int, seed: int = 0) -> list[Trajectory]:
    return random_rows(vocab, PROMPT, [n - PROMPT for n in total.tolist()], seed)


def timed_step(worker, cfg: LearnerConfig, pack: bool, batch, totals) -> dict[str, float]:
    """One train step: its forward + objective + backward wall time (the worker's clock) and
    the CPU time of the whole step (the optimizer step, the same in both modes, is ~1% of it)."""
    worker.cfg = dataclasses.replace(cfg, pack_sequences=pack)
    cpu = time.process_time()
    m = worker.train_step(batch, totals).metrics
    cpu = time.process_time() - cpu
    wall = m["perf/forward_s"] + m["perf/objective_s"] + m["perf/backward_s"]
    return {"wall": wall, "cpu": cpu, "padding": m["perf/padding_frac"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per mode each) per workload")
    parser.add_argument("--rows", type=int, default=16, help="sequences per batch")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--workloads", default="long-tailed", help="comma-separated: long-tailed, uniform")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from learner.worker import LearnerWorker

    path, n_params = save_model(Path(tempfile.mkdtemp()) / "model")
    cfg = LearnerConfig(
        model_path=path, world_size=1, zero_stage=0, lr=1e-6, micro_batch_tokens=args.micro_batch_tokens
    )
    worker = LearnerWorker(cfg, rank=0)  # world size 1: it hosts its own loopback store
    started = time.perf_counter()
    results = {}
    for kind in args.workloads.split(","):
        total = lengths(kind, args.rows)
        batch = collate(trajectories(total, MODEL["vocab_size"]), np.random.default_rng(1).normal(size=len(total)))
        totals, tokens = batch_totals(batch), float(batch.attention_mask.sum())
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for r in range(args.rounds + 1):  # round 0 warms both paths up and is not counted
            for pack in (True, False) if r % 2 else (False, True):
                run = timed_step(worker, cfg, pack, batch, totals)
                if r:
                    runs[pack].append(run)
                label = "packed" if pack else "padded"
                print(f"{kind} round {r} {label}: {tokens / run['wall']:.0f} tokens/s wall, "
                      f"{tokens / run['cpu']:.0f} per CPU-second", file=sys.stderr)  # fmt: skip
        results[kind] = (
            total,
            {  # tokens over the summed time of the mode's steps
                p: {k: tokens * len(v) / sum(x[k] for x in v) for k in ("wall", "cpu")} | {"padding": v[0]["padding"]}
                for p, v in runs.items()
            },
        )
    worker.engine.destroy()
    print(f"model {n_params / 1e6:.1f}M params fp32, {args.threads} thread(s), {args.rows} sequences per batch, budget "
          f"{args.micro_batch_tokens} tokens, {args.rounds} interleaved rounds, "
          f"{time.perf_counter() - started:.0f}s")  # fmt: skip
    for kind, (total, tps) in results.items():
        for pack in (False, True):
            t = tps[pack]
            print(f"{kind:<12} {'packed' if pack else 'padded'}: {t['wall']:>5.0f} tokens/s wall clock, "
                  f"{t['cpu']:>5.0f} per CPU-second, padding {t['padding']:.0%} of computed positions "
                  f"(lengths {total.min()}..{total.max()}, mean {total.mean():.0f})")  # fmt: skip
    # The machine may be shared: CPU time is what the step costs, wall clock includes waiting for
    # the cores. On a machine of its own the two ratios agree.
    for kind, (_, tps) in results.items():
        cpu, wall = (tps[True][k] / tps[False][k] for k in ("cpu", "wall"))
        print(f"{kind} packed/padded tokens/s: {cpu:.2f}x (CPU time; wall clock {wall:.2f}x)")


if __name__ == "__main__":
    main()
