"""Train/inference mismatch on a Mixture-of-Experts model, with and without routing replay, at
the same weights and under staleness.

1. A vLLM engine serves the model (rollout.dtype auto: bf16 on CPUs with native bf16, as
   training runs it; --dtype to choose) and samples --groups x --samples responses to
   arithmetic prompts at temperature 1, recording the experts it routed every token to. It
   samples --train-batches more batches of the same size for the learner to train on.
2. A `LearnerWorker` (in-process, world size 1, ZeRO 0, float32) at the engine's weights scores
   the first batch with learner.routing_replay off and rollout: per response token the k3
   estimate of KL(mu || pi) (mean) and |delta log p| (mean and max), and the fraction of
   (token, MoE layer) pairs whose learner top-k set differs from the engine's.
3. Staleness: for each setting, the learner (rebuilt from the model, same seed) trains on the
   other batches (GRPO advantages from the task's reward, the objective --objective) and after
   each of --lags updates scores the first batch again: the data is then that many versions
   stale, and the mismatch is the engine's old policy against the learner's new one.

Run: .venv/bin/python -m bench.routing_replay [--model tiny-moe --groups 16 --samples 4 --lags 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[routing] {msg}", file=sys.stderr, flush=True)


async def sample(path: str, dtype: str, prompts: list[list[int]], samples: int, batches: int, max_new: int):
    """`batches` lists of (prompt index, Completion), every prompt once per batch, one engine."""
    from rollout.config import RolloutConfig
    from rollout.vllm_engine import VllmEngine

    cfg = RolloutConfig(model_path=path, dtype=dtype, n=samples, max_new_tokens=max_new, seed=0,
                        max_model_len=max(map(len, prompts)) + max_new + 8)  # fmt: skip
    engine = VllmEngine(cfg)
    await engine.start()
    try:
        out = []
        for b in range(batches):
            groups = await asyncio.gather(*(engine.generate(p, samples, f"b{b}-p{i}") for i, p in enumerate(prompts)))
            out.append([(i, c) for i, group in enumerate(groups) for c in group])
        return out, _resolved(cfg)
    finally:
        await engine.shutdown()


def _resolved(cfg) -> str:
    from rollout.engine import resolve_dtype

    return str(resolve_dtype(cfg)).removeprefix("torch.")


def trajectories(batch, prompts: list[list[int]], answers: list[str], tokenizer, tag: str):
    from buffer.trajectory import Trajectory
    from rollout.tasks import arithmetic

    out = []
    for k, (i, c) in enumerate(batch):
        if c.routed_experts is None:
            raise SystemExit("the engine returned no routing: is the model a Mixture-of-Experts?")
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        out.append(Trajectory(
            traj_id=f"{tag}-{k}", group_id=f"{tag}-p{i}", group_size=1, prompt_ids=np.array(prompts[i]),
            response_ids=np.array(c.token_ids), behavior_logprobs=np.array(c.logprobs),
            token_versions=np.zeros(len(c.token_ids)), version_start=0, version_end=0,
            reward=arithmetic.reward(text, answers[i]),
            routed_experts=c.routed_experts.reshape(-1), routing_shape=c.routed_experts.shape[1:],
        ))  # fmt: skip
    return out


def batch_of(trajs):
    from learner.advantages import group_advantages
    from learner.batching import collate

    rewards = np.array([t.reward for t in trajs], dtype=np.float32)
    return collate(trajs, group_advantages(rewards, [t.group_id for t in trajs], True).numpy())


def mismatch(worker, batch) -> dict[str, float]:
    """The learner's policy against the engine's behaviour log-probs on the response tokens, and
    how often the learner's own routing differs from the engine's (whatever it runs on)."""
    from learner.sharding import batch_totals

    lp = worker.compute_logprobs(batch)
    metrics = worker.evaluate_loss(batch, batch_totals(batch)).metrics
    mask = batch.response_mask.bool()
    log_ratio = (lp - batch.behavior_logprobs).double()[mask]
    k3 = torch.expm1(log_ratio) - log_ratio
    return {
        "k3": float(k3.mean()), "mean_abs": float(log_ratio.abs().mean()), "max_abs": float(log_ratio.abs().max()),
        "routing_differs": 1.0 - metrics["routing/agreement"],
    }  # fmt: skip


def run_setting(path: str, replay: str, held, train_batches, lags: list[int], args) -> list[dict]:
    from learner.config import LearnerConfig
    from learner.sharding import batch_totals
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(model_path=path, routing_replay=replay, objective=args.objective, lr=args.lr, seed=0,
                        micro_batch_tokens=4096)  # fmt: skip
    worker = LearnerWorker(cfg)
    try:
        rows = [{"replay": replay, "lag": 0, **mismatch(worker, held)}]
        for step, batch in enumerate(train_batches, start=1):
            metrics = worker.train_step(batch, batch_totals(batch)).metrics
            log(f"{replay} step {step}: loss {metrics['actor/loss']:.4f}, "
                f"grad norm {metrics.get('actor/grad_norm', 0):.3f}, skipped {metrics['actor/step_skipped']:.0f}")
            if step in lags:
                rows.append({"replay": replay, "lag": step, **mismatch(worker, held)})
        return rows
    finally:
        worker.engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.routing_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lags", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--objective", default="grpo")
    p.add_argument("--lr", type=float, default=1e-5)
    args = p.parse_args()
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import AutoTokenizer

    from rollout.tasks import arithmetic
    from vespo.models import resolve_model

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    problems = arithmetic.problems(args.groups, seed=7)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for q in problems]  # fmt: skip
    answers = [q.answer for q in problems]
    started = time.perf_counter()
    sampled, dtype = asyncio.run(sample(path, args.dtype, prompts, args.samples, 1 + max(args.lags),
                                        args.max_new_tokens))  # fmt: skip
    batches = [batch_of(trajectories(b, prompts, answers, tok, f"b{k}")) for k, b in enumerate(sampled)]
    log(f"sampled {len(batches)} batches of {len(sampled[0])} in {time.perf_counter() - started:.0f}s ({dtype})")
    rows = []
    for replay in ("off", "rollout"):
        rows += run_setting(path, replay, batches[0], batches[1:], args.lags, args)
    first = batches[0]
    tokens = int(first.response_mask.sum())
    layers, top_k = first.routed_experts.shape[2:]
    print(f"model {args.model}: engine {dtype}, learner float32; {len(sampled[0])} samples, {tokens} response "
          f"tokens; routing {layers} MoE layers x top-{top_k}: {layers * top_k} bytes per token")
    print("| replay | lag (updates) | k3 KL per token | mean abs dlogp | max abs dlogp | routing differs |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["lag"], r["replay"])):
        print(f"| {r['replay']} | {r['lag']} | {r['k3']:.2e} | {r['mean_abs']:.4f} | {r['max_abs']:.3f} | "
              f"{r['routing_differs']:.2%} |")


if __name__ == "__main__":
    main()
