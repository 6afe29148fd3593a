"""Learner throughput at ZeRO 0 and 2 on the tiny and a ~20M-parameter model, and where a step's time goes.

Two DeepSpeed ranks as Ray actors on this machine (gloo on CPU). Prints train tokens/s per
configuration and the share of a step spent in the model forward, the objective, the
backward and the optimizer, all measured in the same run.
Run: .venv/bin/python -m bench.learner [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from buffer.trajectory import Trajectory
from learner.config import LearnerConfig
from learner.group import LearnerGroup

MODELS = {
    "tiny (0.1M)": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1
    ),
    "small (20M)": dict(
        vocab_size=10000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6
    ),
}


def save_model(path: Path, spec: dict) -> tuple[str, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **spec, num_key_value_heads=spec["num_attention_heads"], head_dim=64, max_position_embeddings=512
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return str(path), sum(p.numel() for p in model.parameters())


def workload(vocab: int, rows: int, prompt: int, response: int, seed: int = 0) -> list[Trajectory]:
    return random_rows(vocab, prompt, [response] * rows, seed)


def random_rows(vocab: int, prompt: int, responses: list[int], seed: int = 0) -> list[Trajectory]:
    """Groups of 4 with random tokens, near-uniform behaviour log-probs and random rewards: a
    learner's work without an engine (what it costs does not depend on what the tokens say)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, response in enumerate(responses):
        out.append(
            Trajectory(
                traj_id=str(i), group_id=str(i // 4), group_size=4,
                prompt_ids=rng.integers(1, vocab, prompt), response_ids=rng.integers(1, vocab, response),
                behavior_logprobs=np.full(response, -np.log(vocab)) + rng.normal(0, 0.05, response),
                token_versions=np.zeros(response), version_start=0, version_end=0, reward=float(rng.random()),
            )
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=96)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for label, spec in MODELS.items():
        path, n_params = save_model(tmp / label.split()[0], spec)
        trajs = workload(spec["vocab_size"], args.rows, args.prompt, args.response)
        for stage in (0, 2):
            cfg = LearnerConfig(model_path=path, world_size=2, zero_stage=stage, micro_batch_tokens=1024)
            group = LearnerGroup(cfg)
            batch = group.make_batch(trajs)
            group.train_step(batch)  # warm-up: compile the fused objective, touch the optimizer state
            walls, parts = [], []
            for _ in range(args.steps):
                start = time.perf_counter()
                metrics = group.train_step(batch).metrics
                walls.append(time.perf_counter() - start)
                parts.append(metrics)
            group.shutdown()
            tokens = float(batch.attention_mask.sum())
            keys = ("perf/forward_s", "perf/objective_s", "perf/backward_s", "perf/optimizer_s")
            spent = {k: statistics.median(p[k] for p in parts) for k in keys}
            total = sum(spent.values())
            rows.append(
                (label, n_params, stage, tokens / statistics.median(walls), {k: v / total for k, v in spent.items()})
            )
            print(f"done {label} ZeRO-{stage}", file=sys.stderr)
    seq = args.prompt + args.response
    print(f"{args.rows} sequences x {seq} tokens per step, 2 ranks (gloo), median of {args.steps} steps")
    head = ("model", "params", "ZeRO", "tokens/s", "forward", "objective", "backward", "optimizer")
    print("{:<12} {:>8} {:>5} {:>9} {:>8} {:>10} {:>9} {:>10}".format(*head))
    for label, n, stage, tps, share in rows:
        f, o, b, opt = (share[k] for k in ("perf/forward_s", "perf/objective_s", "perf/backward_s", "perf/optimizer_s"))
        print(f"{label:<12} {n / 1e6:>7.1f}M {stage:>5} {tps:>9.0f} {f:>8.1%} {o:>10.1%} {b:>9.1%} {opt:>10.1%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
