"""Cluster scale by simulation: the real controller, fleet, sources, weight sync, buffer and
admission code driving simulated engines and learner ranks at the paper's layout.

    python -m bench.simulate [--sync-steps 10] [--async-steps 20] [--sweep 48 96 192 384] [--sweep-steps 16]
                             [--scale 250] [--caps 2] [--budgets 0.001 0.0015] [--model qwen3-30b-a3b]
                             [--lora-rank 16 [--lora-targets q_proj k_proj v_proj o_proj]]

Engines are continuous-batching decoders and the learner a data-parallel group, timed by the
cost model of bench/sim_model.py (a 7B model on H100s); the clock runs `scale` times faster
than real time (bench/sim_world.py). Printed: sync (N=1) against async (staleness cap 4) at
48 engines, 16 learner ranks, 256 prompts x 8 responses a step, then a sweep of engine counts
at a fixed load per engine (prompts and learner ranks grow with the engines) for where the
controller itself stops keeping up. With --budgets: async under fixed version caps (--caps)
against `buffer.divergence_budget` admission, the learner reporting KL by lag from the cost
model's drift per version, on throughput (learner idle, samples dropped, the cap in force).
With --model, another profile of vespo/config/model_profile.py (qwen3-30b-a3b: MoE, engines
of TP 4 on the same 48 rollout GPUs, ZeRO-3), and its memory, broadcast and FLOPs lines.
With --lora-rank (learner.lora), the learner trains an adapter on --lora-targets: syncs send
the adapter alone, the learner's FLOPs and ZeRO-3 grads are the adapter's (lora_cost_model).
One process, one run; compare the figures within it.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import numpy as np

from bench.sim_model import (
    BROADCAST_BYTES_S,
    BROADCAST_LATENCY_S,
    H100_BF16_FLOPS,
    LEARNER_NET_BYTES_S,
    MICRO_BATCH_TOKENS,
    RAY_CALL_CPU_S,
    RAY_CALL_S,
    TRAIN_MFU,
    WEIGHT_BYTES,
    CostModel,
)  # fmt: skip
from bench.sim_run import Layout, SimResult, simulate
from learner.config import LLAMA_PROJECTIONS
from vespo.config import model_profile

PUBLISHED = "AReaL: up to 2.77x (arXiv 2505.24298); veRL fully-async recipe: 2.35-2.67x on 128 GPUs (Qwen2.5-7B)"
BASE = Layout("async")  # the paper's layout: 48 engines, 16 ranks, 256 prompts x 8 a step
# a cell of learner.batching.collate's tensors: input_ids, attention_mask (int64), response_mask,
# behaviour log-probs, advantages (float32), token versions (int64)
PADDED_BYTES_PER_CELL = 8 + 8 + 4 + 4 + 4 + 8


def driver_cell_s(model: CostModel, rows: int = 32, repeats: int = 7) -> float:
    """Seconds per padded cell the learner group's driver spends making a batch (collate to the
    longest row, then one shard per rank), measured here on `rows` rows of the model's lengths."""
    import torch

    from buffer.trajectory import Trajectory
    from learner.batching import collate
    from learner.sharding import shard

    torch.set_num_threads(1)
    lengths, _ = model.group_lengths("driver-probe", rows)
    lengths[0] = model.max_response  # a full batch always holds a response cut at the cap
    trajs = [Trajectory(f"g/{i}", "g", rows, np.zeros(model.prompt_tokens, np.int32), np.zeros(n, np.int32),
                        np.full(n, -0.5, np.float32), np.zeros(n, np.int32), 0, 0)
             for i, n in enumerate(lengths)]  # fmt: skip
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        shard(collate(trajs, np.zeros(rows, np.float32)), BASE.ranks)
        best = min(best, time.perf_counter() - started)
    return best / (rows * (model.prompt_tokens + model.max_response))


def staleness_line(r: SimResult) -> str:
    counts = r.staleness()
    total = sum(counts.values())
    return " ".join(f"{k}:{v / total:.0%}" for k, v in sorted(counts.items()))


def tokens_s(r: SimResult) -> float:
    """Trained tokens per simulated second, steady state."""
    k = r.steady_steps
    return sum(t.tokens for t in r.train[-k:]) / (r.step_s * k)


def dropped(r: SimResult) -> float:
    """Share of the groups generated that the buffer dropped as too stale."""
    return r.dropped_groups / max(r.generated_groups, 1)


def compare(sync: SimResult, asyn: SimResult) -> list[str]:
    lines = [f"{'mode':<12} {'steps':>5} {'s/step':>7} {'tokens/s':>9} {'learner idle':>12} {'engines busy':>12} "
             f"{'dropped':>8} {'real s':>6}  staleness of trained samples"]  # fmt: skip
    for r in (sync, asyn):
        lines.append(f"{r.layout.label:<12} {r.steps:>5} {r.step_s:>7.1f} {tokens_s(r):>9.0f} {r.learner_idle:>12.1%} "
                     f"{r.engine_busy:>12.1%} {dropped(r):>8.1%} {r.real_s:>6.1f}  "
                     f"{staleness_line(r)}")  # fmt: skip
    lines += [
        f"async/sync speedup: {sync.step_s / asyn.step_s:.2f}x per step, {tokens_s(asyn) / tokens_s(sync):.2f}x in "
        f"trained tokens/s ({PUBLISHED})",
        "controller per step (real seconds of CPU; calls are Ray remote calls in the real system):",
    ]
    for r in (sync, asyn):
        calls = r.calls_per_step()
        top = ", ".join(f"{k} {v:.0f}" for k, v in calls.most_common(4))
        lines.append(
            f"  {r.layout.label:<11} own CPU {1e3 * r.cpu_per_step('loop'):.1f} ms loop + "
            f"{1e3 * r.cpu_per_step('feeder'):.1f} ms feeder; {sum(calls.values()):.0f} remote calls ({top}); "
            f"as Ray calls +{r.client_cpu_per_step():.2f} s client CPU; buffer "
            f"{1e3 * r.buffer_cpu_s / r.steps:.0f} ms; padded-batch build {r.driver_s / r.steps:.2f} s"
        )
    return lines


def admission_lines(results: list[SimResult]) -> list[str]:
    """Fixed version caps against divergence budgets: what each rule cost in throughput."""
    lines = [f"{'rule':<16} {'s/step':>7} {'tokens/s':>9} {'learner idle':>12} {'dropped':>8} {'mean cap':>8}  "
             "staleness of trained samples"]  # fmt: skip
    for r in results:
        cap = float(np.mean(r.caps_in_force()[-r.steady_steps :]))
        lines.append(f"{r.layout.label:<16} {r.step_s:>7.1f} {tokens_s(r):>9.0f} {r.learner_idle:>12.1%} "
                     f"{dropped(r):>8.1%} {cap:>8.2f}  {staleness_line(r)}")  # fmt: skip
    return lines


def sweep(engines: list[int], steps: int, scale: float, model: CostModel, base: Layout = BASE) -> list[SimResult]:
    out = []
    for e in engines:
        k = e / base.engines
        ranks, prompts = round(base.ranks * k), round(base.groups_per_step * k)
        layout = Layout("async", engines=e, ranks=ranks, groups_per_step=prompts,
                        steps=steps, warmup_steps=steps * 5 // 8, scale=scale)  # fmt: skip
        out.append(simulate(layout, model))
    return out


def sweep_lines(results: list[SimResult]) -> list[str]:
    rates = [tokens_s(r) / r.layout.engines for r in results]
    lines = [f"{'engines':>7} {'ranks':>5} {'prompts':>7} {'s/step':>6} {'tokens/s':>8} {'scaling':>7} {'dropped':>7} "
             f"{'loop s':>6} {'feeder CPU':>10} {'calls':>6} {'round s':>7} {'build s':>7} {'padded GB':>9} "
             f"{'real s':>6}"]  # fmt: skip
    for r, rate in zip(results, rates, strict=True):
        feeder = (r.cpu_per_step("feeder") + r.client_cpu_per_step("feeder")) / r.step_s
        calls, round_s = sum(r.calls_per_step().values()), r.step_s / max(r.feeder_rounds, 1)
        lines.append(f"{r.layout.engines:>7} {r.layout.ranks:>5} {r.layout.groups_per_step:>7} {r.step_s:>6.1f} "
                     f"{tokens_s(r):>8.0f} {rate / rates[0]:>7.0%} {dropped(r):>7.1%} {r.loop_s():>6.2f} "
                     f"{feeder:>10.0%} {calls:>6.0f} {round_s:>7.3f} {r.driver_s / r.steps:>7.2f} "
                     f"{padded_gb(r):>9.1f} {r.real_s:>6.1f}")  # fmt: skip
    return lines + bottleneck(results)


def padded_gb(r: SimResult) -> float:
    """The padded batch and its shards, in the controller's process, each step."""
    width = r.model.prompt_tokens + r.model.max_response
    return r.layout.groups_per_step * r.layout.n * width * PADDED_BYTES_PER_CELL * 2 / 1e9


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def _crossing(fit: tuple[float, float], limit: float) -> str:
    a, b = fit
    return f"~{(limit - a) / b:,.0f}" if b > 0 else "none (it does not grow)"


def bottleneck(results: list[SimResult]) -> list[str]:
    """Where each part of the controller's cost that grows with the engines reaches what it is
    measured against (linear fits over the sweep, extrapolated past it)."""
    es = [r.layout.engines for r in results]
    step = float(np.mean([r.step_s for r in results]))
    first = results[0]
    interval = (
        first.step_s * first.layout.engines / first.layout.groups_per_step
    )  # an engine's groups finish this often
    feeder = max((r.cpu_per_step("feeder") + r.client_cpu_per_step("feeder")) / r.step_s for r in results)
    build = _fit(es, [r.driver_s / r.steps for r in results])
    loop = _crossing(_fit(es, [r.loop_s() for r in results]), step)
    rounds = _crossing(_fit(es, [r.step_s / max(r.feeder_rounds, 1) for r in results]), interval)
    per_engine_gb = padded_gb(first) / first.layout.engines
    return [
        f"extrapolated from {es[0]}-{es[-1]} engines (steady step ~{step:.0f} s), the controller stops keeping up:",
        f"  its loop (own CPU, round trips of {RAY_CALL_S * 1e3:.2f} ms and {RAY_CALL_CPU_S * 1e6:.0f} us client CPU "
        f"a call), in series with the learner, takes the whole step at {loop} engines",
        f"  a feeder round (blocking calls one engine after the other) takes the {interval:.0f} s between one engine's "
        f"group completions at {rounds} engines; its thread uses at most {feeder:.0%} of a core (it waits on "
        "round trips)",
        f"  the learner group's padded batch, built in the controller's process, takes the whole step at "
        f"{_crossing(build, step)} engines ({build[1] * 1e3:.1f} ms and {per_engine_gb:.3f} GB a step per engine: "
        f"100 GB of it at ~{100 / per_engine_gb:,.0f} engines)",
    ]


def profile_lines(profile: model_profile.ModelProfile, model: CostModel, base: Layout,
                  adapter: model_profile.Adapter | None = None) -> list[str]:  # fmt: skip
    """Memory per learner rank, broadcast bytes, decode and training FLOPs of the profile on the
    layout (model_profile.describe), a step's tokens at the cost model's mean length."""
    sequences, length = base.groups_per_step * base.n, model.prompt_tokens + model.mean_length
    return model_profile.describe(
        profile, zero_stage=profile.zero_stage, ranks=base.ranks, bf16=True, micro_batch_tokens=MICRO_BATCH_TOKENS,
        tp=profile.engine_gpus, receivers=base.engines * profile.engine_gpus, step_tokens=sequences * length,
        step_note=f"{sequences} sequences of {length:.0f} tokens, the mean", adapter=adapter,
    )  # fmt: skip


def lora_cost_model(model: CostModel, adapter: model_profile.Adapter, ranks: int) -> CostModel:
    """The cost model of a learner.lora run: a sync sends the adapter (at the broadcast rate,
    its load time scaled by its bytes a GPU as CostModel.of scales full weights'); a token costs
    the learner 4 FLOPs a frozen active parameter and 6 an adapter one (same MFU assumed), and
    ZeRO-3 gathers the weights as before but reduce-scatters only the adapter's grads."""
    p = adapter.profile
    sent = adapter.sync_bytes()
    broadcast_s = sent / BROADCAST_BYTES_S + BROADCAST_LATENCY_S * (sent / p.engine_gpus) / WEIGHT_BYTES
    rate = TRAIN_MFU * H100_BF16_FLOPS / model_profile.train_flops(p, 1, adapter)
    note = f"learner (LoRA): {rate:.0f} tokens/s a rank from compute"
    if p.zero_stage == 3:
        traffic = model_profile.zero3_traffic_bytes(p, ranks, adapter)
        rate = min(rate, MICRO_BATCH_TOKENS * LEARNER_NET_BYTES_S / traffic)
        note += f", {MICRO_BATCH_TOKENS * LEARNER_NET_BYTES_S / traffic:.0f} from ZeRO-3's {traffic / 1e9:.0f} GB"
    note += f"; sync of the adapter ({sent / 1e6:.1f} MB) {broadcast_s:.3f} s"
    return dataclasses.replace(model, broadcast_s=broadcast_s, train_tokens_s_per_rank=rate,
                               notes=(*model.notes, note))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--async-steps", type=int, default=20)
    p.add_argument("--sweep", type=int, nargs="*", help="engine counts (default: the layout's x 1, 2, 4, 8)")
    p.add_argument("--sweep-steps", type=int, default=16)
    p.add_argument("--scale", type=float, default=250.0, help="simulated seconds per real second")
    p.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[],
        help="buffer.divergence_budget values (KL per token) to compare with fixed caps, async",
    )
    p.add_argument(
        "--caps",
        type=int,
        nargs="*",
        default=[2],
        help="fixed version caps to compare with the budgets, besides 4 (only with --budgets)",
    )
    p.add_argument("--model", choices=sorted(model_profile.PROFILES), default=model_profile.QWEN25_7B.name)
    p.add_argument("--lora-rank", type=int, default=0, help="learner.lora.rank: train and sync an adapter (0: off)")
    p.add_argument("--lora-targets", nargs="+", default=list(LLAMA_PROJECTIONS), help="learner.lora.target_modules")
    args = p.parse_args(argv)
    started = time.perf_counter()
    profile = model_profile.PROFILES[args.model]
    adapter = model_profile.Adapter.of(profile, args.lora_rank, args.lora_targets) if args.lora_rank > 0 else None
    base = dataclasses.replace(BASE, engines=BASE.engines // profile.engine_gpus)  # the same 48 rollout GPUs
    model = CostModel.of(profile, BASE.ranks)
    if adapter is not None:
        model = lora_cost_model(model, adapter, BASE.ranks)
    model.driver_cell_s = driver_cell_s(model)
    print("cost model (bench/sim_model.py):")
    for line in model.describe():
        print("  " + line)
    print(
        f"  padded-batch build in the controller's process: {model.driver_cell_s * 1e9:.1f} ns a cell (measured here)"
    )
    if profile is not model_profile.QWEN25_7B or adapter is not None:
        print(f"model (vespo/config/model_profile.py) on {BASE.engines} rollout + {BASE.ranks} learner GPUs:")
        for line in profile_lines(profile, model, base, adapter):
            print("  " + line)
    tp = f" of TP {profile.engine_gpus}" if profile.engine_gpus > 1 else ""
    print(f"layout: {base.engines} engines{tp}, {base.ranks} learner ranks, {base.groups_per_step} prompts x {base.n} "
          f"a step; scale {args.scale:.0f} simulated s per real s\n")  # fmt: skip
    sync = simulate(dataclasses.replace(base, mode="sync", steps=args.sync_steps, scale=args.scale), model)
    warm = args.async_steps // 2  # the first steps fill the pipeline: every engine starts at once
    asyn = simulate(dataclasses.replace(base, steps=args.async_steps, warmup_steps=warm, scale=args.scale), model)
    for line in compare(sync, asyn):
        print(line)
    if args.budgets:
        rules = [dataclasses.replace(asyn.layout, max_staleness=c) for c in args.caps]
        rules += [dataclasses.replace(asyn.layout, divergence_budget=b) for b in args.budgets]
        print(
            f"\nstaleness rules, async ({asyn.layout.label} as above; budgets within version cap "
            f"{BASE.max_staleness}; drift {model.kl_mismatch:g} + {model.kl_per_version:g} nats a version):"
        )
        for line in admission_lines([asyn, *(simulate(layout, model) for layout in rules)]):
            print(line)
    engines = [base.engines * k for k in (1, 2, 4, 8)] if args.sweep is None else args.sweep
    if engines:
        print(
            f"\nsweep: async, fixed load per engine ({base.groups_per_step // base.engines}+ prompts and "
            f"{base.ranks / base.engines:.2f} ranks per engine)"
        )
        for line in sweep_lines(sweep(engines, args.sweep_steps, args.scale, model, base)):
            print(line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nrun time {time.perf_counter() - started:.0f} s, peak memory {peak:.1f} GB")


if __name__ == "__main__":
    main()
