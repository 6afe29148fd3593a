"""Rollout: generation tokens/s of the vLLM engine vs the transformers fallback, and the cost
of one in-place weight update over the weight group vs a plain in-memory copy of the same bytes.

Both engines run as `RolloutActor`s (one after the other: the machine has 2 cores) on the same
prompts with the same sampling settings and the same random weights (loaded first through the
object store, so responses run to max_new_tokens instead of stopping after a few tokens). The
weight update sends the model's full state dict from this process (rank 0, CPU, group on
loopback) both ways a receiver on this node can get it: the shared-memory region
(weightsync/shm.py) and the gloo broadcast. Each is timed twice: the transfer alone (from the
send's start until the last bucket is readable in a bare receiver process, which loads
nothing) and a vLLM update end to end (pause, receive, `reload_weights`, cache reset, resume).
All ratios come from the same run.
Run: .venv/bin/python -m bench.rollout [--model-size tiny|small]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem
from rollout.tasks import arithmetic
from vespo.models.tiny import tiny_model
from weightsync.sender import WeightBroadcaster
from weightsync.transport import plan_to_wire

# A bigger random Llama on the tiny model's tokenizer, for a weight update worth timing.
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, head_dim=64)


def small_model(tiny: Path, out: Path) -> str:
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    base = AutoConfig.from_pretrained(tiny)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=base.vocab_size, num_key_value_heads=SMALL["num_attention_heads"], max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id, bos_token_id=None,
        **SMALL,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tiny.iterdir():  # the tokenizer (and chat template) files
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return str(out)


def random_weights(path: str, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random weights of the model's shape: near-uniform next-token distributions, so
    responses rarely hit <eos> and both engines generate close to max_new_tokens each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def items(problems, tag: str) -> list[PromptItem]:
    return [PromptItem(f"{tag}-{i}", p.prompt, answer=p.answer, sample_id=str(i)) for i, p in enumerate(problems)]


def start(cfg: RolloutConfig):
    actor = rollout_actor(cfg)
    info = ray.get(actor.start.remote())
    assert info["backend"] == cfg.backend, info
    return actor, info


def stop(actor) -> None:
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


def generation(cfg: RolloutConfig, weights, problems, repeats: int) -> dict:
    """Tokens/s of one engine: start, load `weights` (version 1), warm up once, then time
    `repeats` calls that each generate n samples for every prompt concurrently."""
    actor, info = start(cfg)
    try:
        ray.get(actor.load_weights.remote(ray.put(weights), 1))
        warm = ray.get(actor.generate.remote(items(problems, "warm")))
        assert not warm.errors, warm.errors
        tokens, seconds = 0, 0.0
        for r in range(repeats):
            begin = time.perf_counter()
            result = ray.get(actor.generate.remote(items(problems, f"run{r}")))
            seconds += time.perf_counter() - begin
            assert not result.errors, result.errors
            assert all((t.token_versions == 1).all() for t in result.trajectories)
            tokens += result.num_tokens
        samples = len(problems) * cfg.n * repeats
        print(f"done {cfg.backend}: {tokens} tokens in {seconds:.1f}s", file=sys.stderr)
        return {"startup_s": info["startup_s"], "tokens": tokens, "seconds": seconds, "samples": samples}
    finally:
        stop(actor)


@ray.remote(num_cpus=0)
class Landing:
    """A bare receiver in a process of its own: the transfer alone, nothing loaded."""

    def join(self, host: str, port: int, secret: str) -> bool:
        from weightsync.transport import open_group

        self.group = open_group(host, port, 1, 2, "gloo", secret)
        return self.group.local is not None

    def receive(self, wire: list) -> tuple[float, int]:
        """When the last bucket became readable here (perf_counter is the machine's monotonic
        clock, comparable across processes), and the bytes received."""
        from weightsync.transport import plan_from_wire, receive

        n = 0
        for bucket in receive(self.group, plan_from_wire(wire), torch.device("cpu")):
            n += sum(t.numel() * t.element_size() for _, t in bucket)
        return time.perf_counter(), n

    def close(self) -> None:
        self.group.close()


def transfers(weights: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds from the start of a send until the last bucket is readable in the receiver,
    through each path, and of a memcpy of the same tensors: interleaved, one of each per round,
    so that load from other processes on the machine hits all three alike."""
    paths = {"shm": True, "broadcast": False}
    senders = {p: WeightBroadcaster(1, device=torch.device("cpu"), host="127.0.0.1", same_node=shm)
               for p, shm in paths.items()}  # fmt: skip
    landings = {p: Landing.remote() for p in paths}
    joins = [landings[p].join.remote(bc.host, bc.port, bc.secret) for p, bc in senders.items()]
    for bc in senders.values():
        bc.connect()
    assert ray.get(joins) == list(paths.values())
    plan = senders["shm"].plan(weights.items())
    wire = plan_to_wire(plan)
    dst = {k: torch.empty_like(v) for k, v in weights.items()}
    times: dict[str, list[float]] = {"shm": [], "broadcast": [], "memcpy": []}
    for r in range(repeats + 1):  # the first round is a warm-up
        begin = time.perf_counter()
        for k, v in weights.items():
            dst[k].copy_(v)
        if r:
            times["memcpy"].append(time.perf_counter() - begin)
        for p, bc in senders.items():
            ref = landings[p].receive.remote(wire)
            time.sleep(0.3)  # the receiver is listening before the clock starts
            begin = time.perf_counter()
            sent = bc.broadcast(weights.items(), plan)
            landed, n = ray.get(ref)
            assert n == sent.bytes, (n, sent)
            if r:
                times[p].append(landed - begin)
    for p, bc in senders.items():
        ray.get(landings[p].close.remote())
        ray.kill(landings[p])
        bc.close()
    return {p: statistics.median(t) for p, t in times.items()}


def weight_update(cfg: RolloutConfig, weights: dict[str, torch.Tensor], repeats: int) -> dict:
    """One vLLM actor; `repeats` updates of the full state dict through each path (the learner's
    side is this process, as in tests/rollout_fixtures.Sender), then as many object-store loads."""
    actor, _ = start(cfg)
    try:
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        version = 1
        walls: dict[str, list[float]] = {"shm": [], "broadcast": []}
        store = []
        for path in walls:
            bc = WeightBroadcaster(1, device=torch.device("cpu"), host="127.0.0.1", same_node=path == "shm")
            join = actor.init_weight_group.remote(bc.host, bc.port, 1, bc.world_size, bc.backend, bc.secret)
            bc.connect()
            ray.get(join)
            assert (bc.group.local is not None) == (path == "shm")
            plan = bc.plan(weights.items())
            wire = plan_to_wire(plan)
            for r in range(repeats + 1):  # the first update is a warm-up
                version += 1
                begin = time.perf_counter()
                ref = actor.receive_weights.remote(wire, version)
                sent = bc.broadcast(weights.items(), plan)
                out = ray.get(ref)
                wall = time.perf_counter() - begin
                assert out["version"] == version and out["bytes"] == nbytes == sent.bytes, (out, nbytes, sent)
                if r:
                    walls[path].append(wall)
            bc.close()
        for r in range(repeats + 1):
            version += 1
            begin = time.perf_counter()
            out = ray.get(actor.load_weights.remote(ray.put(weights), version))
            if r:
                store.append(time.perf_counter() - begin)
        assert ray.get(actor.version.remote()) == version
        bc.close()
        return {
            "bytes": nbytes,
            "buckets": len(plan),
            "update_shm_s": statistics.median(walls["shm"]),
            "update_broadcast_s": statistics.median(walls["broadcast"]),
            "object_store_s": statistics.median(store),
        }
    finally:
        stop(actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-repeats", type=int, default=2, help="timed generate calls per engine")
    parser.add_argument("--update-repeats", type=int, default=5, help="timed weight updates")
    parser.add_argument("--num-cpus", type=float, default=2, help="Ray CPUs (= torch threads) of each engine actor")
    parser.add_argument("--transfer-repeats", type=int, default=15, help="timed rounds of transfers and memcpy")
    parser.add_argument("--skip-generation", action="store_true", help="time the weight update only")
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        path = str(tiny_model())
        if args.model_size == "small":
            path = small_model(Path(path), tmp / "small")
        weights = random_weights(path, seed=1)
        n_params = sum(t.numel() for t in weights.values())
        problems = arithmetic.problems(args.prompts, seed=0, max_digits=2)
        base = dict(
            model_path=path, n=args.n, max_new_tokens=args.max_new_tokens, max_model_len=args.max_new_tokens + 64,
            num_cpus=args.num_cpus, seed=0,
        )  # fmt: skip
        gen = {}
        for backend in () if args.skip_generation else ("vllm", "transformers"):
            gen[backend] = generation(RolloutConfig(backend=backend, **base), weights, problems, args.gen_repeats)
        moved = transfers(weights, args.transfer_repeats)
        upd = weight_update(RolloutConfig(backend="vllm", **base), weights, args.update_repeats)
        copy_s = moved["memcpy"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = upd["bytes"] / 1e6
    print(
        f"model: {args.model_size} ({n_params / 1e6:.2f}M params, {mb:.1f} MB fp32), random weights; "
        f"{args.prompts} arithmetic prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
        f"{args.gen_repeats} timed calls per engine after one warm-up; engine actors with num_cpus={args.num_cpus}"
    )
    if gen:
        print(f"{'engine':<14} {'startup s':>10} {'tokens':>8} {'tokens/sample':>14} {'seconds':>8} {'tokens/s':>9}")
    for backend, g in gen.items():
        per = g["tokens"] / g["samples"]
        tps = g["tokens"] / g["seconds"]
        print(f"{backend:<14} {g['startup_s']:>10.1f} {g['tokens']:>8} {per:>14.1f} {g['seconds']:>8.1f} {tps:>9.0f}")

    print(
        f"\nweight update: {mb:.1f} MB in {upd['buckets']} bucket(s), median of {args.update_repeats} after a warm-up"
    )
    print(f"transfers and memcpy: median of {args.transfer_repeats} interleaved rounds")
    print(f"{'path':<60} {'ms':>8} {'MB/s':>9} {'x memcpy':>9}")
    reload = lambda path: upd[f"update_{path}_s"] - moved[path]  # noqa: E731
    rows = [
        ("transfer, shared memory (landed in the receiver)", moved["shm"]),
        ("transfer, gloo broadcast on loopback (landed)", moved["broadcast"]),
        ("vLLM update end to end, shared memory", upd["update_shm_s"]),
        ("  of which the rest: RPC, pause, reload_weights, repack", reload("shm")),
        ("vLLM update end to end, gloo broadcast", upd["update_broadcast_s"]),
        ("  of which the rest: RPC, pause, reload_weights, repack", reload("broadcast")),
        ("object store -> file -> vLLM (fallback), end to end", upd["object_store_s"]),
        ("in-memory dst.copy_(src), same tensors (between transfers)", copy_s),
    ]
    for label, s in rows:
        print(f"{label:<60} {s * 1e3:>8.1f} {upd['bytes'] / s / 1e6:>9.0f} {copy_s / s:>9.3f}")
    if args.model_size == "tiny":
        print(
            "note: the tiny model is ~1 MB, so the update times are per-call latency (RPCs, pause/resume), "
            "not bandwidth; use --model-size small for a meaningful bytes/s"
        )
    print("\nsummary (same run), bytes/s as a fraction of memcpy:")
    if gen:
        vllm_tps = gen["vllm"]["tokens"] / gen["vllm"]["seconds"]
        hf_tps = gen["transformers"]["tokens"] / gen["transformers"]["seconds"]
        print(f"  (generation tokens/s, vLLM / transformers:        {vllm_tps / hf_tps:6.2f}x)")
    print(f"  transfer, shared memory / memcpy:                  {copy_s / moved['shm']:6.3f}x")
    print(f"  transfer, broadcast / memcpy:                      {copy_s / moved['broadcast']:6.3f}x")
    print(f"  vLLM update end to end, shared memory / memcpy:    {copy_s / upd['update_shm_s']:6.3f}x")
    print(f"  vLLM update end to end, broadcast / memcpy:        {copy_s / upd['update_broadcast_s']:6.3f}x")


if __name__ == "__main__":
    main()
