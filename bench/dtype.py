"""bfloat16 against float32 on CPU for smollm2-135m: engine and learner tokens/s, and the
train/inference log-prob mismatch each choice brings.

Which dtype the CPU default should be depends on both sides of the trade: what bf16 buys in
speed, and how far it moves the learner's log-probs away from the engine's behaviour
log-probs (the mismatch VESPO's sequence weight corrects, and must not be swamped by). So one
run measures both, on the same prompts:
1. engine: a `VllmEngine` per dtype, each in its own spawned process, both up at once so
   their timed rounds alternate (fp32, bf16, bf16, fp32, ...) and drift in the shared cores'
   load hits both. A round samples n responses for each word problem (rendered with the chat
   template, bench.real_model.rendered_prompts) at temperature 1, every response exactly
   --length tokens (rollout.imposed_median_tokens, a negligible spread), so both dtypes
   generate the same token count; generated tokens / wall second, after a warm-up request.
2. mismatch: each engine then samples the same prompts once more with lengths left to the
   model, as in training (imposed lengths hold end-of-sequence back, and vLLM's processed
   log-probs renormalise without it: a gap that is the length rule's, not the dtype's). A
   `LearnerWorker` (in-process, world size 1, ZeRO 0) in each dtype scores both engines'
   trajectories before any step (`compute_logprobs`, the learner's pi_old) against their
   behaviour log-probs: mean and max |delta log p| per response token, and over sequences the
   mean and spread of s = sum_t delta (VESPO's log sequence weight) and the effective sample
   size of exp(s) as a fraction of the sequences.
3. learner: `train_step` (forward + backward + optimizer) on the first --learner-rows of the
   fp32 engine's natural-length trajectories, rewards random (the cost does not depend on
   them, but they give a real gradient); the worker is rebuilt in the other dtype between
   rounds (fp32, bf16, bf16, fp32, ...), one warm-up step after each build, then --steps timed.
Run: .venv/bin/python -m bench.dtype [--prompts 4 --samples 8 --length 48 --learner-rows 8 --steps 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.real_model import MODEL, rendered_prompts, say

DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def log(msg: str) -> None:
    print(f"[dtype] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return os.getloadavg()[0]


def gemm_rates(m: int, k: int = 576, n: int = 1536, repeats: int = 10) -> dict[str, float]:
    """FLOP/s of an (m x k) @ (k x n) matmul per dtype, the best of `repeats`, the dtypes
    interleaved: the ceiling bf16 can lift on these cores (avx512_bf16, no AMX)."""
    mats = {d: (torch.randn(m, k).to(getattr(torch, d)), torch.randn(k, n).to(getattr(torch, d))) for d in DTYPES}
    best = dict.fromkeys(DTYPES, math.inf)
    for _ in range(repeats):
        for d, (a, b) in mats.items():
            torch.matmul(a, b)
            t = time.perf_counter()
            torch.matmul(a, b)
            best[d] = min(best[d], time.perf_counter() - t)
    return {d: 2 * m * k * n / s for d, s in best.items()}


def engine_server(conn, path: str, dtype: str, prompts: list[list[int]], warm: list[int], opts: dict) -> None:
    """One engine in a process of its own, answering the bench's commands until "stop": both
    engines stay up, so their timed rounds can alternate under the same load."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # bf16 logs a line per weight it casts
    try:
        asyncio.run(_serve(conn, path, dtype, prompts, warm, opts))
    except BaseException:
        import traceback

        conn.send({"error": traceback.format_exc()})


async def _serve(conn, path: str, dtype: str, prompts: list[list[int]], warm: list[int], opts: dict) -> None:
    import dataclasses

    from rollout.config import RolloutConfig
    from rollout.vllm_engine import VllmEngine

    length, n = opts["length"], opts["samples"]
    imposed = RolloutConfig(
        model_path=path, dtype=dtype, n=n, max_new_tokens=length,
        max_model_len=max(len(p) for p in [*prompts, warm]) + length + 16, max_num_seqs=opts["max_num_seqs"],
        seed=0, imposed_median_tokens=length, imposed_length_sigma=1e-9,
    )  # fmt: skip
    engine = VllmEngine(imposed)
    started = time.perf_counter()
    await engine.start()
    try:
        await engine.generate(warm, 2, "warm")  # a prompt not in the timed set
        conn.send({"startup_s": time.perf_counter() - started})
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
            # "natural": lengths left to the model, as in training. With imposed lengths vLLM holds
            # end-of-sequence back and its processed log-probs renormalise without it, which the
            # learner's full distribution cannot match: no use for the mismatch.
            engine.cfg = dataclasses.replace(imposed, imposed_median_tokens=0) if command == "natural" else imposed
            begin, load_start = time.perf_counter(), load()
            groups = await asyncio.gather(*(engine.generate(p, n, f"{command}-p{i}") for i, p in enumerate(prompts)))
            conn.send({"seconds": time.perf_counter() - begin, "load": (load_start, load()), "groups": groups})
    finally:
        await engine.shutdown()
    conn.send({"stopped": True})


class Engines:
    """The engine processes (spawned: vLLM code must not run at import), one per dtype."""

    def __init__(self, path: str, prompts, warm, opts: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = {}, {}
        for dtype in DTYPES:  # started together: start-up is not what is compared
            parent, child = ctx.Pipe()
            self.conns[dtype] = parent
            self.procs[dtype] = ctx.Process(target=engine_server, args=(child, path, dtype, prompts, warm, opts))
            self.procs[dtype].start()
        try:
            self.startup = {d: self._reply(d)["startup_s"] for d in DTYPES}
        except BaseException:
            self.close()  # the other engine may be up: stop it too
            raise

    def _reply(self, dtype: str) -> dict:
        reply = self.conns[dtype].recv()
        if "error" in reply:
            raise RuntimeError(f"the {dtype} engine failed:\n{reply['error']}")
        return reply

    def ask(self, dtype: str, command: str) -> dict:
        self.conns[dtype].send(command)
        return self._reply(dtype)

    def close(self) -> None:
        for dtype, proc in self.procs.items():
            if proc.is_alive():
                with contextlib.suppress(OSError):  # it may have just died
                    self.conns[dtype].send("stop")
        for dtype, proc in self.procs.items():
            if proc.is_alive() and self.conns[dtype].poll(120):
                self.conns[dtype].recv()  # the engine has shut down
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def trajectories(prompts: list[list[int]], groups, samples: int, seed: int = 0):
    from buffer.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    return [
        Trajectory(
            traj_id=f"p{i}-{j}", group_id=f"p{i}", group_size=samples, prompt_ids=np.array(prompt),
            response_ids=np.array(c.token_ids), behavior_logprobs=np.array(c.logprobs),
            token_versions=np.zeros(len(c.token_ids)), version_start=0, version_end=0,
            reward=float(rng.random() < 0.3),
        )
        for i, (prompt, group) in enumerate(zip(prompts, groups, strict=True))
        for j, c in enumerate(group)
    ]  # fmt: skip


def batch_of(trajs, pad_id: int):
    from learner.advantages import group_advantages
    from learner.batching import collate

    rewards = np.array([t.reward for t in trajs], dtype=np.float32)
    return collate(trajs, group_advantages(rewards, [t.group_id for t in trajs], True).numpy(), pad_id=pad_id)


def mismatch(learner_lp: torch.Tensor, batch) -> dict[str, float]:
    """Learner against engine on the response tokens: per token, and per sequence as VESPO
    weighs it (s = sum_t log pi/mu; ESS of exp(s) as a fraction of the sequences)."""
    mask = batch.response_mask.bool()
    delta = (learner_lp - batch.behavior_logprobs).double() * mask
    s = delta.sum(-1)
    w = torch.exp(s - s.max())
    return {
        "mean_abs": float(delta.abs()[mask].mean()),
        "max_abs": float(delta.abs()[mask].max()),
        "seq_mean": float(s.mean()),
        "seq_std": float(s.std()),
        "ess": float(w.sum() ** 2 / (len(w) * (w**2).sum())),
    }


def learner_phases(path: str, batches: dict[str, object], train, args) -> dict:
    """Both learner dtypes on one worker (rebuilt between them, keeping its process group)."""
    from learner.config import LearnerConfig
    from learner.sharding import batch_totals
    from learner.worker import LearnerWorker

    def config(dtype: str) -> LearnerConfig:
        return LearnerConfig(model_path=path, world_size=1, zero_stage=0, micro_batch_tokens=args.micro_batch_tokens,
                             bf16=dtype == "bfloat16")  # fmt: skip

    totals = batch_totals(train)
    worker, out = None, {d: {"steps": []} for d in DTYPES}
    order = [d for r in range(args.rounds) for d in (DTYPES if r % 2 == 0 else DTYPES[::-1])]
    for dtype in order:
        started = time.perf_counter()
        if worker is None:
            worker = LearnerWorker(config(dtype), rank=0)  # world size 1: it hosts its own loopback store
        else:
            worker.rebuild(config(dtype))
        res = out[dtype]
        res.setdefault("build_s", time.perf_counter() - started)
        res.setdefault("master", master_weights(worker))
        if "logprobs" not in res:  # before any step: the weights the engines sampled with
            res["logprobs"] = {engine_dtype: worker.compute_logprobs(b) for engine_dtype, b in batches.items()}
        worker.train_step(train, totals)  # warm-up
        for _ in range(args.steps):
            t = time.perf_counter()
            metrics = worker.train_step(train, totals).metrics
            res["steps"].append(time.perf_counter() - t)
            res.setdefault("parts", []).append({k: metrics[f"perf/{k}_s"] for k in PARTS})
            log(f"learner {SHORT[dtype]} step: {res['steps'][-1]:.1f}s (load {load():.1f})")
    worker.engine.destroy()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return out


PARTS = ("forward", "objective", "backward", "optimizer")


def master_weights(worker) -> str:
    """What the optimizer updates: the module's dtype, DeepSpeed's wrapper, the AdamW params' dtype."""
    inner = getattr(worker.optimizer, "optimizer", worker.optimizer)
    master = {str(p.dtype).removeprefix("torch.") for g in inner.param_groups for p in g["params"]}
    module = str(next(worker.engine.module.parameters()).dtype).removeprefix("torch.")
    return f"module {module}, {type(worker.optimizer).__name__}, AdamW on {'/'.join(master)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="word problems the engines sample for")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument("--length", type=int, default=48, help="tokens of every response")
    parser.add_argument("--engine-rounds", type=int, default=8, help="timed engine rounds, alternating dtypes")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences an engine decodes together")
    parser.add_argument("--learner-rows", type=int, default=8, help="trajectories per learner step")
    parser.add_argument("--steps", type=int, default=2, help="timed learner steps per build, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="learner builds per dtype, alternating")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0, help="word problem seed")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # bf16 logs a line per weight it casts
    from transformers import AutoTokenizer

    from vespo.models import resolve_model

    path = resolve_model(MODEL)
    pad_id = AutoTokenizer.from_pretrained(path).pad_token_id
    prompts, _ = rendered_prompts(path, args.prompts + 1, args.seed)
    warm, prompts = prompts[0], prompts[1:]
    mean_prompt = statistics.mean(len(p) for p in prompts)
    say(
        f"model: {MODEL}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {load():.1f} at the start"
    )
    train_tokens = args.learner_rows * int(mean_prompt + args.length)
    gemm = gemm_rates(train_tokens)
    say(
        f"GEMM {train_tokens}x576 @ 576x1536: fp32 {gemm['float32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {gemm['bfloat16'] / 1e9:.1f} GFLOP/s ({gemm['bfloat16'] / gemm['float32']:.2f}x)"
    )

    # 1. engines: both up, timed rounds alternating (ABBA...), then one natural-length set each
    opts = {"samples": args.samples, "length": args.length, "max_num_seqs": args.max_num_seqs}
    log("starting a float32 and a bfloat16 vLLM engine, each in its own process")
    engines = Engines(path, prompts, warm, opts)
    rounds = {d: [] for d in DTYPES}
    try:
        for r in range(args.engine_rounds):
            for dtype in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                rounds[dtype].append(engines.ask(dtype, f"timed{r}"))
                got = rounds[dtype][-1]
                log(f"engine {SHORT[dtype]} round {r}: {got['seconds']:.1f}s (load {got['load'][1]:.1f})")
        natural = {d: engines.ask(d, "natural")["groups"] for d in DTYPES}
    finally:
        engines.close()
    engine_tps = {}
    for dtype, runs in rounds.items():
        lengths = [len(c.token_ids) for g in runs[0]["groups"] for c in g]
        rates = [sum(len(c.token_ids) for g in run["groups"] for c in g) / run["seconds"] for run in runs]
        engine_tps[dtype] = statistics.median(rates)
        loads = "/".join(f"{run['load'][0]:.1f}-{run['load'][1]:.1f}" for run in runs)
        say(
            f"engine {SHORT[dtype]} (vLLM, start-up {engines.startup[dtype]:.0f}s, both at once): {args.prompts} "
            f"prompts (mean {mean_prompt:.0f} tokens) x n={args.samples}, {sum(lengths)} tokens a round (every "
            f"response {min(lengths)}-{max(lengths)}); rounds {', '.join(f'{x:.1f}' for x in rates)} tokens/s "
            f"(load {loads}), median {engine_tps[dtype]:.1f} tokens/s"
        )
    pairs = [a["seconds"] / b["seconds"] for a, b in zip(rounds["float32"], rounds["bfloat16"], strict=True)]
    say(f"engine bf16/fp32 per round (adjacent in time): {', '.join(f'{x:.2f}' for x in pairs)}x")

    # 2 and 3. learner: mismatch first (untrained weights), then train steps
    batches = {d: batch_of(trajectories(prompts, g, args.samples), pad_id) for d, g in natural.items()}
    train = batch_of(trajectories(prompts, natural["float32"], args.samples)[: args.learner_rows], pad_id)
    log("starting the learner")
    lrn = learner_phases(path, batches, train, args)
    train_tokens = int(train.attention_mask.sum())
    learner_tps = {}
    for dtype, res in lrn.items():
        step = statistics.median(res["steps"])
        learner_tps[dtype] = train_tokens / step
        parts = {k: statistics.median(p[k] for p in res["parts"]) for k in PARTS}
        shares = ", ".join(f"{k} {v / sum(parts.values()):.0%}" for k, v in parts.items())
        say(
            f"learner {SHORT[dtype]} ({res['master']}; build {res['build_s']:.0f}s): {args.learner_rows} rows = "
            f"{train_tokens} tokens per step, steps {', '.join(f'{s:.1f}' for s in res['steps'])}s, median "
            f"{step:.1f}s = {learner_tps[dtype]:.1f} tokens/s (fastest {min(res['steps']):.1f}s; {shares})"
        )

    say("")
    say("mismatch (learner log-probs - engine behaviour log-probs, on the engine's own samples):")
    say(f"  {'engine':<7}{'learner':<8}{'mean|d|':>9}{'max|d|':>9}{'mean s':>9}{'std s':>8}{'ESS/N':>7}")
    table = {}
    for engine_dtype in DTYPES:
        for learner_dtype in DTYPES:
            m = table[engine_dtype, learner_dtype] = mismatch(lrn[learner_dtype]["logprobs"][engine_dtype],
                                                              batches[engine_dtype])  # fmt: skip
            say(
                f"  {SHORT[engine_dtype]:<7}{SHORT[learner_dtype]:<8}{m['mean_abs']:>9.5f}{m['max_abs']:>9.4f}"
                f"{m['seq_mean']:>9.3f}{m['seq_std']:>8.3f}{m['ess']:>7.3f}"
            )
    lengths = ", ".join(f"{SHORT[d]} {float(b.response_mask.sum(-1).mean()):.1f}" for d, b in batches.items())
    say(f"  ({len(batches['float32'].input_ids)} sequences per engine, natural lengths <= {args.length}, mean "
        f"{lengths} tokens; s = a sequence's sum, VESPO's log sequence weight)")  # fmt: skip
    base = table["float32", "float32"]
    say("")
    say(f"load average {load():.1f} at the end")
    say(f"engine bf16/fp32 tokens/s: {engine_tps['bfloat16'] / engine_tps['float32']:.2f}x")
    say(f"learner bf16/fp32 tokens/s: {learner_tps['bfloat16'] / learner_tps['float32']:.2f}x")
    for key, label in ((("bfloat16", "float32"), "engine bf16/learner fp32"),
                       (("bfloat16", "bfloat16"), "engine bf16/learner bf16")):  # fmt: skip
        m = table[key]
        say(
            f"mismatch {label} vs the fp32/fp32 baseline: mean |d log p| {m['mean_abs']:.5f} vs "
            f"{base['mean_abs']:.5f} ({m['mean_abs'] / base['mean_abs']:.0f}x), max {m['max_abs']:.4f} vs "
            f"{base['max_abs']:.4f}, std of s {m['seq_std']:.3f} vs {base['seq_std']:.3f}, "
            f"ESS/N {m['ess']:.3f} vs {base['ess']:.3f}"
        )


if __name__ == "__main__":
    main()
