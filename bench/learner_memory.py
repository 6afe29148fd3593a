"""Learner memory and step time with the logits taken whole against taken in chunks.

One in-process learner rank (DeepSpeed, ZeRO 0, the default config) per model and variant, each
in a fresh process: `full` takes the log-probs from the model's whole (rows, tokens, vocabulary)
logits, `chunked` is learner.logprobs as the learner runs it, and `no-head` takes stand-in
log-probs from the final hidden states without any output layer: the same step with no logits
at all. A variant's logits' share of peak memory is then (its peak - no-head's peak) / its peak.

Memory is the process's resident peak (VmHWM, reset before each measured step) with glibc told
to map every allocation over 64 KiB on its own, so freed tensors leave the resident set and the
peak is what one step really held. That setting makes every allocation fault its pages in
afresh, which slows many-small-allocation code most, so step times come from a second process
per variant with the default allocator. A step is what the learner does per batch: pi_old (no
gradient) and one training step.
Run: .venv/bin/python -m bench.learner_memory [--rows 16 --response 110]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("full", "chunked", "no-head")
LARGE_VOCAB = dict(vocab_size=262_144, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)  # fmt: skip


def build_large_vocab(path: Path) -> Path:
    """A Llama with a Gemma-3-sized vocabulary (262k) at a small hidden size, random weights:
    the shape where the vocabulary dominates."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LARGE_VOCAB, max_position_embeddings=1024)).save_pretrained(path)
    return path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _no_head_logprobs(model, input_ids, attention_mask, temperature=1.0, position_ids=None, with_entropy=False):
    """Stand-in log-probs from the final hidden states (bounded, with a gradient): the model's
    whole step without the output layer."""
    import torch

    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                logits_to_keep=1, **extra)  # fmt: skip
    hidden = out.hidden_states[-1][:, :-1].float()
    lp = -math.log(LARGE_VOCAB["vocab_size"]) + 1e-3 * torch.tanh(hidden.mean(-1))
    return (lp, torch.zeros_like(lp).detach()) if with_entropy else lp


def child(model_dir: str, variant: str, rows: int, prompt: int, response: int, steps: int) -> dict:
    import time

    import numpy as np
    import torch

    import learner.packing
    import learner.worker
    from bench.learner import random_rows
    from learner.advantages import advantages
    from learner.batching import collate
    from learner.config import LearnerConfig
    from learner.logprobs import full_logits_token_logprobs
    from learner.sharding import batch_totals
    from learner.worker import LearnerWorker

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    swap = {"full": full_logits_token_logprobs, "no-head": _no_head_logprobs}.get(variant)
    if swap is not None:
        learner.worker.token_logprobs = learner.packing.token_logprobs = swap
    worker = LearnerWorker(LearnerConfig(model_path=model_dir, world_size=1, lr=1e-6))
    vocab = worker.engine.module.config.vocab_size
    trajs = random_rows(vocab, prompt, [response] * rows)
    rewards = np.array([t.reward for t in trajs], dtype=np.float32)
    batch = collate(trajs, advantages("grpo", rewards, [t.group_id for t in trajs]).numpy())
    totals = batch_totals(batch)
    walls, train_walls, peaks, steadies = [], [], [], []
    for i in range(steps + 1):  # the first step makes the optimizer's state: not measured
        steady = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident peak
        start = time.perf_counter()
        old = worker.compute_logprobs(batch)
        trained = type(batch)(**{**{f: getattr(batch, f) for f in batch.__dataclass_fields__}, "old_logprobs": old})
        mid = time.perf_counter()
        worker.train_step(trained, totals)
        end = time.perf_counter()
        if i:
            walls.append(end - start)
            train_walls.append(end - mid)
            peaks.append(_status("VmHWM"))
            steadies.append(steady)
    return dict(variant=variant, vocab=vocab, tokens=int(batch.attention_mask.sum()), peak=max(peaks),
                steady=statistics.median(steadies), step_s=statistics.median(walls),
                train_s=statistics.median(train_walls))  # fmt: skip


def run_child(model_dir: Path, variant: str, args) -> dict:
    """The variant's peak memory (allocator returning freed memory) and step times (default allocator)."""
    memory = _child(model_dir, variant, args, steps=1, extra_env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    timing = _child(model_dir, variant, args, steps=args.steps, extra_env={})
    return {**memory, "step_s": timing["step_s"], "train_s": timing["train_s"]}


def _child(model_dir: Path, variant: str, args, steps: int, extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(extra_env, BENCH_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "bench.learner_memory", "--child", str(model_dir), variant,
           "--rows", str(args.rows), "--prompt", str(args.prompt), "--response", str(args.response),
           "--steps", str(steps)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} on {model_dir.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=110)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="smollm2-135m,vocab-262k")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "VARIANT"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rows, args.prompt, args.response, args.steps)))
        return
    from vespo.models import resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="learner-memory-"))
    results = []
    for name in args.models.split(","):
        model_dir = build_large_vocab(tmp / name) if name == "vocab-262k" else Path(resolve_model(name))
        runs = {v: run_child(model_dir, v, args) for v in VARIANTS}
        results.append((name, runs))
        print(f"done {name}", file=sys.stderr)
    tokens = results[0][1]["full"]["tokens"]
    print(f"{args.rows} rows x {args.prompt + args.response} tokens ({tokens} real), one rank, ZeRO 0, fp32, "
          f"{args.threads} threads; step = pi_old + one training step, median of {args.steps}")  # fmt: skip
    head = ("model", "vocab", "variant", "peak GB", "step GB", "KB/token", "logits share", "step s", "train s")
    print("{:<13} {:>7} {:>8} {:>8} {:>8} {:>9} {:>13} {:>7} {:>8}".format(*head))
    for name, runs in results:
        base = runs["no-head"]["peak"]
        for v in VARIANTS:
            r = runs[v]
            step_bytes = r["peak"] - r["steady"]
            share = "" if v == "no-head" else f"{max(r['peak'] - base, 0) / r['peak']:.1%}"
            per_token = step_bytes / r["tokens"] / 1024
            print(f"{name:<13} {r['vocab']:>7} {v:>8} {r['peak'] / 1e9:>8.2f} {step_bytes / 1e9:>8.2f} "
                  f"{per_token:>9.0f} {share:>13} {r['step_s']:>7.2f} {r['train_s']:>8.2f}")  # fmt: skip
        full, chunked = runs["full"], runs["chunked"]
        ratio = {k: chunked[k] / full[k] for k in ("peak", "step_s", "train_s")}
        print(f"{name}: chunked / full: peak {ratio['peak']:.2f}x, step time {ratio['step_s']:.2f}x, "
              f"train step {ratio['train_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
