"""`tiny-moe`: a tiny Mixture-of-Experts causal LM, built locally from the toy task.

The same recipe as `tiny` (a byte-level BPE tokenizer trained on the arithmetic task's text,
a short next-token warm-up on solved problems, on one thread so the bytes do not depend on
the core count), with a Qwen3-MoE in place of the Llama: 2 layers, each with a router over 8
experts of which 2 serve every token (their weights renormalised to sum to 1), no shared
expert. It exercises what a dense model does not: transformers 5 keeps the experts as fused
3-D parameters (`mlp.experts.gate_up_proj` (experts, 2 x intermediate, hidden) and
`mlp.experts.down_proj`), which the learner trains and broadcasts under those names; vLLM
loads them into its fused-MoE layer as they are (after an update its CPU backend needs them
packed again: weightsync.moe_repack), and exports hold the per-expert checkpoint names.

The experts learn the one-digit sums much faster than `tiny`'s dense MLP, so the warm-up is
shorter. Accuracy on all 100 one-digit sums ("a+b=" prompts, transformers generate; sampled at
temperature 1, four samples each) after N steps of 128: 50 steps 10% greedy / 10% sampled, 100:
39% / 27%, 150: 54% / 42%, 200: 61% / 49%, 250: 93% / 77%, 300: 98% / 92%. 150 steps (about
20 s on one thread) leave rewards neither all 0 nor all 1 with room to climb; vLLM serving the
result scores 54% greedy and 39% sampled (4 x 100 samples).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vespo.models import tiny
from vespo.models.tiny import TinyModelConfig, build_once, cache_root

FORMAT = 1  # bump when the build changes, so stale caches are not reused


@dataclass(frozen=True)
class TinyMoeConfig:
    # tokenizer, corpus and warm-up; its dense-MLP and layer sizes are not used here
    base: TinyModelConfig = TinyModelConfig(warmup_steps=150)
    num_layers: int = 2
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 128

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_moe_model(cfg: TinyMoeConfig | None = None, path: str | Path | None = None) -> Path:
    """The model directory for cfg, built if missing (concurrent callers are safe: build_once)."""
    cfg = cfg or TinyMoeConfig()
    target = Path(path) if path is not None else cache_root() / f"tiny-moe-{cfg.digest()}"
    return build_once(target, lambda out: build(cfg, out))


def build(cfg: TinyMoeConfig, out: Path) -> None:
    texts = tiny.corpus(cfg.base)
    tokenizer = tiny.train_tokenizer(texts, cfg.base.vocab_size)
    model = init_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    if cfg.base.warmup_steps:
        tiny.warm_up(model, tokenizer, texts, cfg.base)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def init_model(cfg: TinyMoeConfig, vocab: int, pad_id: int, eos_id: int):
    """A float32 Qwen3-MoE. head_dim 64: vLLM's CPU attention rejects smaller heads. The router's
    load-balancing loss stays off (as in the config a run loads): the learner computes its own
    loss from log-probs, and an output it never reads would only cost time."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    base = cfg.base
    torch.manual_seed(base.seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=base.hidden_size,
        intermediate_size=cfg.moe_intermediate_size,  # dense layers only (mlp_only_layers): none here
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_heads,
        head_dim=base.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=base.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        dtype="float32",
    )
    return Qwen3MoeForCausalLM(config)
