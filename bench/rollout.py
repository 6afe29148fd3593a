"""Rollout: generation tokens/s of the vLLM engine vs the transformers fallback, and the cost
of one in-place weight update over the weight group vs a plain in-memory copy of the same bytes.

Both engines run as `RolloutActor`s (one after the other: the machine has 2 cores) on the same
prompts with the same sampling settings and the same random weights (loaded first through the
object store, so responses run to max_new_tokens instead of stopping after a few tokens). The
weight update broadcasts the model's full state dict from this process (rank 0, gloo, CPU)
into the vLLM actor and times it end to end (pause, receive, `reload_weights`, cache reset,
resume). All ratios come from the same run.
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


def weight_update(cfg: RolloutConfig, weights: dict[str, torch.Tensor], repeats: int) -> dict:
    """One vLLM actor; `repeats` broadcasts of the full state dict (the learner's side is this
    process, as in tests/rollout_fixtures.Sender), then as many object-store loads."""
    actor, _ = start(cfg)
    try:
        bc = WeightBroadcaster(1, device=torch.device("cpu"))
        join = actor.init_weight_group.remote(bc.host, bc.port, 1, bc.world_size, bc.backend, bc.secret)
        bc.connect()
        ray.get(join)
        plan = bc.plan(weights.items())
        wire = plan_to_wire(plan)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        version = 1
        walls, transfers, store = [], [], []
        for r in range(repeats + 1):  # the first update is a warm-up
            version += 1
            begin = time.perf_counter()
            ref = actor.receive_weights.remote(wire, version)
            sent = bc.broadcast(weights.items(), plan)
            out = ray.get(ref)
            wall = time.perf_counter() - begin
            assert out["version"] == version and out["bytes"] == nbytes == sent.bytes, (out, nbytes, sent)
            if r:
                walls.append(wall)
                transfers.append(sent.seconds)
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
            "update_s": statistics.median(walls),
            "broadcast_s": statistics.median(transfers),
            "object_store_s": statistics.median(store),
        }
    finally:
        stop(actor)


def memcpy_s(weights: dict[str, torch.Tensor], repeats: int) -> float:
    """Median time of `dst.copy_(src)` over the same tensors, destinations allocated once."""
    dst = {k: torch.empty_like(v) for k, v in weights.items()}
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        for k, v in weights.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-repeats", type=int, default=2, help="timed generate calls per engine")
    parser.add_argument("--update-repeats", type=int, default=5, help="timed weight updates")
    parser.add_argument("--num-cpus", type=float, default=2, help="Ray CPUs (= torch threads) of each engine actor")
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
        for backend in ("vllm", "transformers"):
            gen[backend] = generation(RolloutConfig(backend=backend, **base), weights, problems, args.gen_repeats)
        upd = weight_update(RolloutConfig(backend="vllm", **base), weights, args.update_repeats)
        copy_s = memcpy_s(weights, max(args.update_repeats, 5))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = upd["bytes"] / 1e6
    print(
        f"model: {args.model_size} ({n_params / 1e6:.2f}M params, {mb:.1f} MB fp32), random weights; "
        f"{args.prompts} arithmetic prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
        f"{args.gen_repeats} timed calls per engine after one warm-up; engine actors with num_cpus={args.num_cpus}"
    )
    print(f"{'engine':<14} {'startup s':>10} {'tokens':>8} {'tokens/sample':>14} {'seconds':>8} {'tokens/s':>9}")
    for backend, g in gen.items():
        per = g["tokens"] / g["samples"]
        tps = g["tokens"] / g["seconds"]
        print(f"{backend:<14} {g['startup_s']:>10.1f} {g['tokens']:>8} {per:>14.1f} {g['seconds']:>8.1f} {tps:>9.0f}")
    vllm_tps = gen["vllm"]["tokens"] / gen["vllm"]["seconds"]
    hf_tps = gen["transformers"]["tokens"] / gen["transformers"]["seconds"]

    rate = lambda s: upd["bytes"] / s / 1e6  # noqa: E731  MB/s
    print(
        f"\nweight update: {mb:.1f} MB in {upd['buckets']} bucket(s), median of {args.update_repeats} after a warm-up"
    )
    print(f"{'path':<52} {'ms':>8} {'MB/s':>9}")
    rows = [
        ("weight group broadcast -> vLLM, end to end", upd["update_s"]),
        ("  of which the broadcast itself (sender side)", upd["broadcast_s"]),
        ("object store -> file -> vLLM (fallback), end to end", upd["object_store_s"]),
        ("in-memory dst.copy_(src), same tensors", copy_s),
    ]
    for label, s in rows:
        print(f"{label:<52} {s * 1e3:>8.1f} {rate(s):>9.0f}")
    if args.model_size == "tiny":
        print(
            "note: the tiny model is ~1 MB, so the update times are per-call latency (RPCs, pause/resume), "
            "not bandwidth; use --model-size small for a meaningful bytes/s"
        )
    print("\nsummary (same run):")
    print(f"  generation tokens/s, vLLM / transformers:          {vllm_tps / hf_tps:6.2f}x")
    print(f"  weight update bytes/s, weight group / memcpy:      {copy_s / upd['update_s']:6.3f}x")


if __name__ == "__main__":
    main()
