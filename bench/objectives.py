"""Forward+backward time of each objective against plain token-mean REINFORCE.

Prints one table of ratios measured in this one run (machines are noisy; compare ratios,
not absolute times). Run: .venv/bin/python -m bench.objectives [--batch 256 --tokens 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import cache_dir

from learner.objectives import OBJECTIVES, VespoConfig, compute_loss, fused


def make_batch(batch: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, tokens, generator=g) * 3
    behavior = logprobs + torch.randn(batch, tokens, generator=g) * 0.05
    seq_adv = torch.randn(batch, 1, generator=g)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch, 1), generator=g)
    mask = (torch.arange(tokens).unsqueeze(0) < lengths).float()
    return {
        "logprobs": logprobs,
        "behavior_logprobs": behavior,
        "advantages": seq_adv.expand(batch, tokens).contiguous(),
        "mask": mask,
    }


def reinforce(logprobs, behavior_logprobs, advantages, mask):
    """The floor: -mean over valid tokens of A * log pi, no importance weighting at all."""
    return -(advantages * logprobs * mask).sum() / mask.sum()


def time_fwd_bwd(fn, data: dict[str, torch.Tensor], repeats: int) -> float:
    """Best seconds of one forward+backward over `repeats` runs (fresh leaf each time, as in
    a training step). The minimum is the least disturbed by other load on a shared machine."""
    times = []
    for i in range(repeats + 1):
        lp = data["logprobs"].clone().requires_grad_()
        start = time.perf_counter()
        loss = fn(lp)
        loss.backward()
        if i >= 1:  # one warm-up run
            times.append(time.perf_counter() - start)
    return min(times)


def compile_state() -> dict[str, int]:
    """Dynamo's and inductor's counters: a fused path that silently runs eager, recompiles
    inside the timed rounds or is loaded from a cache other processes wrote would otherwise
    show only as an odd ratio."""
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }


def describe_compile(first_call_s: float) -> str:
    state = compile_state()
    paths = [fused.compiled(fn) for fn in (fused.token_sums, fused.scaled_advantages)]
    if not all(path.active for path in paths) or not state["graphs"]:
        return f"first VESPO call: {first_call_s:.1f}s; torch.compile NOT used, `vespo` ran its eager path"
    return (
        f"first VESPO call: {first_call_s:.1f}s; torch.compile used: {state['graphs']} graphs, "
        f"{state['graph_breaks']} graph breaks, inductor cache {cache_dir()} "
        f"({state['cache_hits']} hits, {state['cache_misses']} misses), options {fused.COMPILE_OPTIONS}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10, help="runs per candidate per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    data = make_batch(args.batch, args.tokens)
    rest = {k: v for k, v in data.items() if k != "logprobs"}
    candidates = {"reinforce": lambda lp: reinforce(lp, **rest)}
    for name in OBJECTIVES:
        candidates[name] = lambda lp, name=name: compute_loss(name, lp, **rest)[0]
    eager = VespoConfig(fused=False)
    candidates["vespo-eager"] = lambda lp: compute_loss("vespo", lp, **rest, config=eager)[0]
    start = time.perf_counter()
    candidates["vespo"](data["logprobs"].clone().requires_grad_()).backward()
    print(describe_compile(time.perf_counter() - start))
    graphs_before = compile_state()["graphs"]

    # Rounds interleave the candidates so drift in machine load hits all of them; each ratio
    # is taken within a round, and the median over rounds is reported.
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        round_times = {name: time_fwd_bwd(fn, data, args.repeats) for name, fn in candidates.items()}
        for name, t in round_times.items():
            times[name].append(t)
            ratios[name].append(t / round_times["reinforce"])
    print(f"recompiles during the timed rounds: {compile_state()['graphs'] - graphs_before}")
    print(f"batch {args.batch} x {args.tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Two views of one ratio: the median of per-round ratios, and the ratio of best times (the
    # least disturbed run of each); they part where other load on the machine hit some rounds.
    print(f"{'objective':<11} {'best ms':>8} {'ratio, median of rounds':>24} {'ratio of best times':>20}")
    best_reinforce = min(times["reinforce"])
    for name in candidates:
        best, median = min(times[name]), statistics.median(ratios[name])
        print(f"{name:<11} {best * 1e3:>8.2f} {median:>23.2f}x {best / best_reinforce:>19.2f}x")


if __name__ == "__main__":
    main()
