"""Real model (SmolLM2-135M-Instruct): vLLM engine and learner tokens/s, each as a fraction of a limit measured here.

One run, one process after the other (the machine has 2 cores):
1. limits: float32 GEMM FLOP/s at a model-like shape (tokens x 576 @ 576 x 1536, the MLP
   up-projection) and memory read bandwidth (a sum over a tensor larger than the caches);
2. engine: a `VllmEngine` (float32) samples n responses for each word problem, rendered with
   the chat template; generated tokens / wall second. Its roofs: compute, 2 FLOPs per
   parameter per token (prompt tokens counted once per prompt, as prefix caching shares
   them), and bandwidth, all weight bytes read once per decode step (steps >= the longest
   response per wave of max_num_seqs sequences); the fraction reported is of the tighter;
3. learner: `LearnerWorker` training steps (in-process, world size 1, ZeRO 0, torch AdamW)
   on rows of a real rendered prompt and a random response of --response tokens;
   tokens / step second, after a warm-up step. Its roof: 6 FLOPs per parameter per token.
The limits are measured again right before the learner, since the cores are shared.

Parameters counted: every weight matrix once, the tied embedding included, as the LM head:
its lookup is free, but the LM head is a (576 x 49152) matmul for every token, ~21% of the
model's FLOPs at this size. Attention-score FLOPs (QK^T, AV) are not counted (~2-3% here).
Run: .venv/bin/python -m bench.real_model [--prompts 8 --samples 8 --max-new-tokens 64 --steps 2]
(--preload-ab 2: the engine alone, rollout.preload_libs off and auto alternating, and their ratio)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

MODEL = "smollm2-135m"


def log(msg: str) -> None:
    print(f"[real_model] {msg}", file=sys.stderr, flush=True)


def gemm_flops(m: int, k: int = 576, n: int = 1536, repeats: int = 10) -> float:
    """FLOP/s of a float32 (m x k) @ (k x n) matmul, the best of `repeats` after a warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of reading a float32 tensor of `nbytes` (a sum), the best of `repeats`."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def limits(tokens: int, decode_batch: int) -> dict[str, float]:
    return {
        "gemm": gemm_flops(tokens),  # the compute roof
        "gemm_decode": gemm_flops(decode_batch),  # the same at a decode step's batch (for reference)
        "bandwidth": read_bandwidth(),
    }


def parameter_counts(path: str) -> dict[str, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied matrix once
    embedding = model.get_input_embeddings().weight.numel()
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "tied": int(bool(config.tie_word_embeddings)),
        "layers": config.num_hidden_layers,
        "attn_width": config.num_attention_heads * config.head_dim,
    }


def rendered_prompts(path: str, count: int, seed: int) -> tuple[list[list[int]], list[str]]:
    from transformers import AutoTokenizer

    from rollout.tasks import word_problems

    tok = AutoTokenizer.from_pretrained(path)
    rows = word_problems.rows(count, seed)
    ids = [list(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
           for r in rows]  # fmt: skip
    return ids, [r["reward_model"]["ground_truth"] for r in rows]


async def run_engine(path: str, prompts: list[list[int]], warm: list[int], args, preload: str | None = None) -> dict:
    from rollout.config import RolloutConfig
    from rollout.preload import loaded_in_children
    from rollout.vllm_engine import VllmEngine

    longest = max(len(p) for p in [*prompts, warm])
    cfg = RolloutConfig(
        model_path=path, dtype="float32", n=args.samples, max_new_tokens=args.max_new_tokens,
        max_model_len=longest + args.max_new_tokens + 16, max_num_seqs=args.max_num_seqs, seed=0,
        **({"preload_libs": preload} if preload else {}),
    )  # fmt: skip
    engine = VllmEngine(cfg)
    started = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - started
    iomp = loaded_in_children("libiomp5")
    try:
        await engine.generate(warm, 1, "warm")  # one sample of a prompt not in the timed set
        begin = time.perf_counter()
        groups = await asyncio.gather(*(engine.generate(p, args.samples, f"p{i}") for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - begin
    finally:
        await engine.shutdown()
    return {"startup_s": startup, "seconds": seconds, "groups": groups, "max_num_seqs": cfg.max_num_seqs, "iomp": iomp}


def learner_rows(prompts: list[list[int]], rows: int, response: int, vocab: int, group: int, seed: int = 0):
    from buffer.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        prompt = np.array(prompts[(i // group) % len(prompts)])
        out.append(
            Trajectory(
                traj_id=str(i), group_id=str(i // group), group_size=group, prompt_ids=prompt,
                response_ids=rng.integers(3, vocab, response),
                behavior_logprobs=np.full(response, -np.log(vocab)) + rng.normal(0, 0.05, response),
                token_versions=np.zeros(response), version_start=0, version_end=0, reward=float(rng.random() < 0.3),
            )
        )  # fmt: skip
    return out


def run_learner(path: str, trajectories, steps: int, micro_batch_tokens: int) -> dict:
    from learner.advantages import group_advantages
    from learner.batching import collate
    from learner.config import LearnerConfig
    from learner.sharding import batch_totals
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(model_path=path, world_size=1, zero_stage=0, micro_batch_tokens=micro_batch_tokens)
    started = time.perf_counter()
    worker = LearnerWorker(cfg, rank=0)  # world size 1: it hosts its own loopback store
    startup = time.perf_counter() - started
    rewards = np.array([t.reward for t in trajectories], dtype=np.float32)
    adv = group_advantages(rewards, [t.group_id for t in trajectories], cfg.normalize_adv_std)
    batch = collate(trajectories, adv.numpy(), pad_id=2)
    totals = batch_totals(batch)
    worker.train_step(batch, totals)  # warm-up
    walls, parts = [], []
    for _ in range(steps):
        t = time.perf_counter()
        metrics = worker.train_step(batch, totals).metrics
        walls.append(time.perf_counter() - t)
        parts.append(metrics)
        log(f"learner step {len(walls)}: {walls[-1]:.1f}s")
    worker.engine.destroy()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    keys = ("perf/forward_s", "perf/objective_s", "perf/backward_s", "perf/optimizer_s")
    return {
        "startup_s": startup,
        "step_s": statistics.median(walls),
        "tokens": int(batch.attention_mask.sum()),
        "padded": int(batch.attention_mask.numel()),
        "parts": {k.split("/")[1].removesuffix("_s"): statistics.median(p[k] for p in parts) for k in keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="word problems the engine samples for")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine decodes together")
    parser.add_argument("--learner-rows", type=int, default=8, help="sequences per learner step")
    parser.add_argument("--response", type=int, default=64, help="response tokens of each learner row")
    parser.add_argument("--steps", type=int, default=2, help="timed learner steps after one warm-up step")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0, help="word problem seed")
    parser.add_argument("--preload", choices=("auto", "off"), default=None, help="rollout.preload_libs of the engine")
    parser.add_argument("--preload-ab", type=int, default=0, metavar="ROUNDS",
                        help="only the engine: rounds of preload off and auto, and their tokens/s ratio")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from transformers import AutoTokenizer

    from rollout.tasks import word_problems
    from vespo.models import resolve_model

    path = resolve_model(MODEL)
    params = parameter_counts(path)
    n_params = params["total"]
    prompts, answers = rendered_prompts(path, args.prompts + 1, args.seed)
    warm, prompts, answers = prompts[0], prompts[1:], answers[1:]
    mean_prompt = statistics.mean(len(p) for p in prompts)
    n_seqs = args.prompts * args.samples
    decode_batch = min(n_seqs, args.max_num_seqs)
    train_tokens = int(args.learner_rows * (mean_prompt + args.response))
    say(
        f"model: {MODEL}, float32; {n_params / 1e6:.1f}M parameters counted = {params['non_embedding'] / 1e6:.1f}M "
        f"non-embedding + {params['embedding'] / 1e6:.1f}M embedding ({'tied, ' if params['tied'] else ''}"
        f"counted once, as the LM head matmul); torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )

    # 1. engine
    lim_engine = limits(train_tokens, decode_batch)
    say(limits_line("before the engine", lim_engine, train_tokens, decode_batch))
    if args.preload_ab:
        return preload_ab(path, prompts, warm, answers, args, n_params, train_tokens)
    log("starting the vLLM engine")
    eng = asyncio.run(run_engine(path, prompts, warm, args, args.preload))
    tok = AutoTokenizer.from_pretrained(path)
    completions = [c for group in eng["groups"] for c in group]
    generated = sum(len(c.token_ids) for c in completions)
    longest = max(len(c.token_ids) for c in completions)
    correct = [
        word_problems.reward(tok.decode(c.token_ids, skip_special_tokens=True), answer)
        for group, answer in zip(eng["groups"], answers, strict=True)
        for c in group
    ]
    engine_tps = generated / eng["seconds"]
    prompt_tokens = sum(len(p) for p in prompts)
    waves = math.ceil(n_seqs / eng["max_num_seqs"])
    compute_roof = generated / (2 * n_params * (generated + prompt_tokens) / lim_engine["gemm"])
    weight_bytes = n_params * 4
    bandwidth_roof = generated / (waves * longest * weight_bytes / lim_engine["bandwidth"])
    tighter = "compute" if compute_roof <= bandwidth_roof else "bandwidth"
    engine_frac = engine_tps / min(compute_roof, bandwidth_roof)
    say(
        f"engine (vLLM, start-up {eng['startup_s']:.0f}s): {args.prompts} prompts (mean {mean_prompt:.0f} tokens) "
        f"x n={args.samples}, temperature 1, max_new_tokens={args.max_new_tokens}: {generated} tokens "
        f"(mean {generated / len(completions):.1f}, longest {longest}) in {eng['seconds']:.1f}s = "
        f"{engine_tps:.0f} tokens/s; answered right {statistics.mean(correct):.1%} of {len(correct)}"
    )
    say(
        f"  roofs: compute {compute_roof:.0f} tokens/s (GEMM / (2 x params x (generated + prompt tokens))), "
        f"bandwidth {bandwidth_roof:.0f} tokens/s (read bandwidth / ({waves} wave(s) x {longest} steps x "
        f"{weight_bytes / 1e6:.0f} MB)); tighter: {tighter}; engine at {engine_frac:.1%} of it "
        f"({engine_tps / compute_roof:.1%} of compute, {engine_tps / bandwidth_roof:.1%} of bandwidth)"
    )

    # 2. learner
    trajs = learner_rows(prompts, args.learner_rows, args.response, tok.vocab_size, args.samples)
    lim_learner = limits(train_tokens, decode_batch)
    say(limits_line("before the learner", lim_learner, train_tokens, decode_batch))
    log("starting the learner")
    lrn = run_learner(path, trajs, args.steps, args.micro_batch_tokens)
    learner_tps = lrn["tokens"] / lrn["step_s"]
    learner_roof = lim_learner["gemm"] / (6 * n_params)
    parts = lrn["parts"]
    shares = ", ".join(f"{k} {v / sum(parts.values()):.0%}" for k, v in parts.items())
    say(
        f"learner (DeepSpeed ZeRO 0, 1 rank, torch AdamW, start-up {lrn['startup_s']:.0f}s): {args.learner_rows} "
        f"rows x (~{mean_prompt:.0f} prompt + {args.response} response) = {lrn['tokens']} tokens "
        f"({lrn['padded']} padded) per step, median of {args.steps} after a warm-up: {lrn['step_s']:.1f}s/step = "
        f"{learner_tps:.0f} tokens/s ({shares})"
    )
    say(f"  roof: {learner_roof:.0f} tokens/s (GEMM / (6 x params)); learner at {learner_tps / learner_roof:.1%} of it")
    say(
        f"summary (same run, load average {os.getloadavg()[0]:.1f} at the end): engine {engine_tps:.0f} tokens/s = "
        f"{engine_frac:.1%} of its {tighter} roof; learner {learner_tps:.0f} tokens/s = "
        f"{learner_tps / learner_roof:.1%} of its compute roof; "
        f"engine / learner tokens/s {engine_tps / learner_tps:.1f}x"
    )


def preload_ab(path, prompts, warm, answers, args, n_params: int, rows: int) -> None:
    """Engine tokens/s with rollout.preload_libs off and auto, alternating in one process (ABBA
    rounds cancel a drift in the machine's load); medians per mode and their ratio. The GEMM
    roof is measured again before each engine, as the cores are shared."""
    from transformers import AutoTokenizer

    from rollout.preload import find_libs
    from rollout.tasks import word_problems

    tok = AutoTokenizer.from_pretrained(path)
    prompt_tokens = sum(len(p) for p in prompts)
    say(f"preload A/B: auto preloads {find_libs() or 'nothing (none found)'}")
    rates: dict[str, list[float]] = {"off": [], "auto": []}
    for r in range(args.preload_ab):
        for mode in ("off", "auto") if r % 2 == 0 else ("auto", "off"):
            log(f"round {r + 1}: engine with preload {mode}")
            gemm, load = gemm_flops(rows), os.getloadavg()[0]
            eng = asyncio.run(run_engine(path, prompts, warm, args, mode))
            done = [(c, a) for group, a in zip(eng["groups"], answers, strict=True) for c in group]
            generated = sum(len(c.token_ids) for c, _ in done)
            right = statistics.mean(word_problems.reward(tok.decode(c.token_ids, skip_special_tokens=True), a)
                                    for c, a in done)  # fmt: skip
            rates[mode].append(generated / eng["seconds"])
            roof = generated / (2 * n_params * (generated + prompt_tokens) / gemm)
            say(
                f"round {r + 1} preload {mode} (load {load:.1f}): libiomp5 in the engine process "
                f"{'yes' if eng['iomp'] else 'no'}; "
                f"{generated} tokens in {eng['seconds']:.1f}s = {rates[mode][-1]:.0f} tokens/s "
                f"({rates[mode][-1] / roof:.1%} of compute roof); answered right {right:.1%}"
            )
    off, auto = statistics.median(rates["off"]), statistics.median(rates["auto"])
    rounds = ", ".join(f"{a / o:.2f}" for a, o in zip(rates["auto"], rates["off"], strict=True))
    say(
        f"summary (load average {os.getloadavg()[0]:.1f} at the end): engine tokens/s, median of "
        f"{args.preload_ab}: preload off {off:.0f}, auto {auto:.0f}; auto / off {auto / off:.2f}x "
        f"(each round: {rounds})"
    )


def say(line: str) -> None:
    print(line, flush=True)


def limits_line(when: str, lim: dict[str, float], tokens: int, decode_batch: int) -> str:
    return (
        f"limits {when}: GEMM {tokens}x576 @ 576x1536 {lim['gemm'] / 1e9:.1f} GFLOP/s "
        f"(with {decode_batch} rows, a decode step's: {lim['gemm_decode'] / 1e9:.1f}); "
        f"read bandwidth {lim['bandwidth'] / 1e9:.1f} GB/s"
    )


if __name__ == "__main__":
    main()
