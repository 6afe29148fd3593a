"""`tiny-agent`: the tiny Llama warmed up on the format of a tool-using episode.

The task (reasoning-gym's `products`: "Solve the following multiplication: 47 * 318 ...") is
one a 2-layer model cannot compute, but can solve with the calculator: call it with the
expression, read the result, answer with it. The warm-up shows two kinds of episode, half
each: the tool-using one, and a direct answer (the right number, which the model cannot
compute and so only imitates). It stops while the model still often answers directly and
still miscopies, so RL has a signal (tool episodes succeed, direct ones rarely do) and room.
The episodes are built by the same `ChatFormat` and tool-call format the runner uses, so the
warm-up sees exactly the token sequences an episode produces; only the model's turns are
trained. Nothing is downloaded: the tokenizer is trained on the episodes' text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout.chat_format import ChatFormat
from rollout.tools.base import ToolCall
from rollout.tools.calls import format_tool_call
from vespo.models import tiny
from vespo.models.tiny import TinyModelConfig, build_once, cache_root, init_model

ROLES = ("system", "user", "assistant", "tool")
# renders `tools=` itself (a short list of names), so the episode's prompt stays short
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "", "parameters": {}}}


@dataclass(frozen=True)
class TinyAgentConfig:
    model: TinyModelConfig = TinyModelConfig(vocab_size=400, max_digits=3, warmup_steps=700, warmup_batch=64)
    episodes: int = 4000
    tool_share: float = 0.5  # of warm-up episodes, those that call the calculator

    def digest(self) -> str:
        return f"{self.model.digest()}-{self.episodes}-{self.tool_share}"


def tiny_agent_model(cfg: TinyAgentConfig | None = None) -> Path:
    cfg = cfg or TinyAgentConfig()
    return build_once(cache_root() / f"tiny-agent-{cfg.digest()}", lambda out: build(cfg, out))


def problems(count: int, seed: int, max_digits: int) -> list[tuple[str, str, str]]:
    """(question, expression, answer) from reasoning-gym's products generator."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("products", seed=seed, size=count, min_digits=2, max_digits=max_digits)
    return [(e["question"], e["metadata"]["expression"], str(e["answer"])) for e in data]


def build(cfg: TinyAgentConfig, out: Path) -> None:
    # seed 10_000 + ...: a range of seeds no run config uses for its train or held-out items
    items = problems(cfg.episodes, 10_000 + cfg.model.seed, cfg.model.max_digits)
    tokenizer = train_tokenizer(items, cfg.model.vocab_size)
    rng = random.Random(cfg.model.seed)
    chat = ChatFormat(tokenizer, [CALCULATOR])
    rows = [episode_tokens(chat, q, expr, ans, rng.random() < cfg.tool_share) for q, expr, ans in items]
    model = init_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    warm_up(model, rows, tokenizer.pad_token_id, cfg.model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_tokenizer(items: list[tuple[str, str, str]], vocab_size: int):
    texts = [f"tools: calculator{q}{format_tool_call(ToolCall('calculator', {'expression': e}))}{a}"
             for q, e, a in items]  # fmt: skip
    return tiny.train_tokenizer(texts, vocab_size, ROLES, CHAT_TEMPLATE)


def episode_tokens(chat: ChatFormat, question: str, expression: str, answer: str, use_tool: bool) -> tuple[list, list]:
    """(ids, trained) of one episode as the runner would record it."""
    tokenizer = chat.tokenizer
    ids = chat.opening([{"role": "user", "content": question}])
    trained = [0] * len(ids)

    def turn(text: str) -> list[int]:
        out = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.extend(out)
        trained.extend([1] * len(out))
        return out

    if use_tool:
        call = turn(format_tool_call(ToolCall("calculator", {"expression": expression})))
        result = chat.after_turn(call, [{"role": "tool", "content": answer}])
        ids.extend(result)
        trained.extend([0] * len(result))
    turn(answer)
    return ids, trained


def warm_up(model, rows: list[tuple[list, list]], pad_id: int, cfg: TinyModelConfig) -> None:
    """Next-token training on the model's turns only."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, (row, trained) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, trained, strict=True)])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r, _ in rows])[:, None]).long()
    tiny.train_next_token(model, ids, mask, labels, cfg)
