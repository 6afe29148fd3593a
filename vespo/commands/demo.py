"""A seconds-long demonstration of the objectives under staleness, with no model or engine.

The policy is a table of per-position logits over a small vocabulary; a response is T tokens
sampled independently, and the reward is the share of positions that match a hidden target
string. Each step samples groups from a *stale* copy of the policy (the weights from
`staleness` updates ago, as a lagging rollout engine would), computes GRPO group
advantages and applies one objective. It shows the objective code doing its job end to end;
the real trainer on a real model is `vespo train` (see the README).
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from learner.advantages import group_advantages
from learner.objectives import OBJECTIVES, compute_loss


@dataclass(frozen=True)
class DemoConfig:
    vocab: int = 8
    length: int = 12
    groups: int = 16  # prompts per step
    group_size: int = 8  # n responses per prompt
    steps: int = 150
    staleness: int = 4  # behaviour policy = weights from this many updates ago
    lr: float = 0.5
    seed: int = 0


def run(objective: str, cfg: DemoConfig) -> list[float]:
    """Train one objective; returns the mean reward of each step's (stale) samples."""
    g = torch.Generator().manual_seed(cfg.seed)
    target = torch.randint(cfg.vocab, (cfg.length,), generator=g)
    logits = torch.zeros(cfg.length, cfg.vocab, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    history: collections.deque[torch.Tensor] = collections.deque(maxlen=cfg.staleness + 1)
    rewards = []
    n = cfg.groups * cfg.group_size
    for _ in range(cfg.steps):
        history.append(logits.detach().clone())
        behaviour = history[0]  # the oldest kept snapshot: `staleness` versions behind
        tokens = torch.distributions.Categorical(logits=behaviour.expand(n, -1, -1)).sample()
        reward = (tokens == target).float().mean(-1)
        adv = group_advantages(reward, torch.arange(n) // cfg.group_size)
        lp = torch.log_softmax(logits, -1).expand(n, -1, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        blp = torch.log_softmax(behaviour, -1).expand(n, -1, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        loss, _ = compute_loss(objective, lp, blp, adv.unsqueeze(-1).expand_as(lp), torch.ones_like(lp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(reward.mean().item())
    return rewards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo demo", description=__doc__.splitlines()[0])
    parser.add_argument("--staleness", type=int, default=DemoConfig.staleness)
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = parser.parse_args(argv)
    cfg = DemoConfig(staleness=args.staleness, steps=args.steps, seed=args.seed)
    console = Console()
    console.print(
        f"[bold]vespo objective demo[/]: {cfg.groups} groups x {cfg.group_size} samples per step, "
        f"behaviour policy {cfg.staleness} updates stale, {cfg.steps} steps (chance reward {1 / cfg.vocab:.3f})"
    )
    table = Table("objective", "reward: first 10 steps", "last 10 steps", "best")
    for name in OBJECTIVES:
        r = run(name, cfg)
        table.add_row(name, f"{sum(r[:10]) / 10:.3f}", f"{sum(r[-10:]) / 10:.3f}", f"{max(r):.3f}")
    console.print(table)
