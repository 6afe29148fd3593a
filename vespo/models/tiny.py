"""A tiny causal LM and its tokenizer, built locally from the toy task: nothing is downloaded.

The real stack (vLLM, DeepSpeed, Ray) needs a real Hugging Face model directory. This builds
one in seconds: a byte-level BPE tokenizer trained on the arithmetic task's text, a 2-layer
Llama (head_dim 64: vLLM's CPU attention rejects smaller heads) and a short next-token
warm-up on solved problems, so the model ends answers with <eos>, its distributions are
peaked (log-prob comparisons mean something) and rewards are neither all 0 nor all 1 (RL has
a signal). The result is cached under a hash of its config and rebuilt only when missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rollout.tasks import arithmetic, repeated_addition

FORMAT = 1  # bump when the build changes, so stale caches are not reused
PAD, EOS = "<pad>", "<eos>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 512
    vocab_size: int = 300  # BPE target: 256 byte symbols + specials + a few merges
    corpus_size: int = 5_000
    max_digits: int = 1  # 200 steps reach ~40% sampled accuracy on 1 digit, ~1% on 2 digits
    task: str = "arithmetic"  # the corpus: "arithmetic" ("a+b=c") or "repeated_addition" (long answers)
    warmup_steps: int = 200  # next-token steps on solved problems; 0 leaves the random init
    warmup_batch: int = 128
    warmup_lr: float = 3e-3
    seed: int = 0

    def digest(self) -> str:
        fields = asdict(self)
        if fields["task"] == "arithmetic":  # the field came later: the default model keeps its cache
            del fields["task"]
        text = json.dumps({"format": FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("VESPO_CACHE", Path.home() / ".cache" / "vespo"))


def tiny_model(cfg: TinyModelConfig | None = None, path: str | Path | None = None) -> Path:
    """The model directory for cfg, built if missing. Concurrent callers are safe: each builds
    in a private temporary directory and the first rename wins."""
    cfg = cfg or TinyModelConfig()
    target = Path(path) if path is not None else cache_root() / f"tiny-{cfg.digest()}"
    return build_once(target, lambda out: build(cfg, out))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging)` if missing: into a private temporary directory, then
    renamed into place, so concurrent callers are safe (the first rename wins) and a crash never
    leaves half a model behind."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build(cfg: TinyModelConfig, out: Path) -> None:
    texts = corpus(cfg)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model = init_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    if cfg.warmup_steps:
        warm_up(model, tokenizer, texts, cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def corpus(cfg: TinyModelConfig) -> list[str]:
    if cfg.task == "repeated_addition":
        return repeated_addition.corpus(cfg.corpus_size, seed=cfg.seed)
    if cfg.task == "arithmetic":
        return arithmetic.corpus(cfg.corpus_size, seed=cfg.seed, max_digits=cfg.max_digits)
    raise ValueError(f"tiny model: unknown task {cfg.task!r}; choose arithmetic or repeated_addition")


def train_tokenizer(
    texts: list[str], vocab_size: int, roles: tuple[str, ...] = ROLES, chat_template: str = CHAT_TEMPLATE
):
    """Byte-level BPE (any text round-trips) with digits kept as single tokens; each of `roles`
    is a special token `<|role|>` of `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, *(f"<|{r}|>" for r in roles)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=chat_template, model_max_length=512
    )


def init_model(cfg: TinyModelConfig, vocab: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def warm_up(model, tokenizer, texts: list[str], cfg: TinyModelConfig) -> None:
    """Plain next-token training on "a+b=c<eos>" (every token, prompt included), on one thread:
    a parallel reduction splits its sums by the thread count, so a warm-up on 2 cores and one
    on 64 would start RL from different models. One thread gives the same bytes on any core
    count (a few seconds for this model)."""
    rows = [tokenizer(t + EOS)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    mask = (ids != tokenizer.pad_token_id).long()
    train_next_token(model, ids, mask, ids.masked_fill(mask == 0, -100), cfg)


def train_next_token(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, cfg: TinyModelConfig) -> None:
    """`cfg.warmup_steps` AdamW steps on random batches of rows (labels -100: not trained), on one
    thread: the same bytes on any core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr)
        model.train()
        for _ in range(cfg.warmup_steps):
            pick = torch.randint(len(ids), (cfg.warmup_batch,), generator=g)
            loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
