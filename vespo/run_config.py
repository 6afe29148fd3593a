"""The whole run's configuration: one typed tree, loaded from YAML plus dotted overrides.

Every section is the component's own config dataclass (rollout, learner, buffer, task,
wandb); `train` holds what belongs to the controller. Cross-section rules (impossible
combinations) are checked here, once, with messages that say which keys to change.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from buffer.config import BufferConfig
from learner.config import LearnerConfig
from rollout.config import RolloutConfig
from rollout.tasks.registry import TaskConfig
from vespo import typed_config
from vespo.run_logger import WandbConfig


@dataclass
class TrainConfig:
    mode: Literal["async", "sync"] = "async"
    # sync: each rollout batch of staleness_ratio * groups_per_step groups is split into
    # staleness_ratio sequential updates (the paper's N); 1 is plain on-policy training
    staleness_ratio: int = 1
    steps: int = 500  # learner steps (optimizer updates)
    groups_per_step: int = 32  # prompts per learner step; each brings rollout.n samples
    sync_every: int = 1  # learner steps between weight broadcasts (async mode)
    num_engines: int = 1  # rollout engine actors
    max_inflight_groups: int = 32  # per engine: prompts being generated at once (async mode)
    weight_bucket_mb: int = 64  # size of one weight-broadcast bucket
    recompute_old_logprobs: bool = False  # learner recomputes pi_old (train/inference mismatch correction)
    eval_every: int = 50  # learner steps between held-out evaluations; 0 disables
    eval_prompts: int = 64
    eval_log_samples: int = 4  # sampled responses (prompt, response, reward) logged at each evaluation
    checkpoint_every: int = 0  # learner steps between checkpoints; 0: only at the end
    output_dir: str = "runs/vespo"  # checkpoints and wandb files go under it
    batch_timeout_s: float = 600.0  # the learner gives up waiting for a batch after this long
    engine_restart_timeout_s: float = 600.0  # how long a dead engine may take to come back (Ray restart + start)
    group_retries: int = 2  # a group that fails inside a live engine is handed out again this often, then dropped
    keep_checkpoints: int = 3  # complete checkpoints kept (the newest); 0 keeps all
    ray_address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS / an initialised Ray)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.groups_per_step < 1 or self.sync_every < 1 or self.num_engines < 1:
            raise ValueError("train.steps, groups_per_step, sync_every and num_engines must be >= 1")
        if self.staleness_ratio < 1:
            raise ValueError(f"train.staleness_ratio must be >= 1, got {self.staleness_ratio}")
        if self.eval_every < 0 or self.checkpoint_every < 0 or self.max_inflight_groups < 1:
            raise ValueError("train.eval_every and checkpoint_every must be >= 0, max_inflight_groups >= 1")
        if self.group_retries < 0 or self.keep_checkpoints < 0:
            raise ValueError("train.group_retries and train.keep_checkpoints must be >= 0")
        if self.batch_timeout_s <= 0 or self.engine_restart_timeout_s <= 0:
            raise ValueError("train.batch_timeout_s and train.engine_restart_timeout_s must be > 0")
        if self.eval_log_samples < 0 or self.eval_prompts < 1:
            raise ValueError("train.eval_log_samples must be >= 0 and train.eval_prompts >= 1")


@dataclass
class RunConfig:
    model: str = "tiny"  # a local Hugging Face model directory, or "tiny": the locally built tiny model
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(name="arithmetic", max_digits=1))
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=8, max_new_tokens=8, max_model_len=64))
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=5e-4, warmup_steps=2))
    buffer: BufferConfig = field(default_factory=lambda: BufferConfig(max_staleness=4))
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        t = self.train
        if t.mode == "sync" and t.sync_every != 1:
            raise ValueError("train.sync_every applies to async mode; in sync mode use train.staleness_ratio")
        if t.mode == "sync" and self.buffer.max_staleness < t.staleness_ratio - 1:
            raise ValueError(
                f"sync mode with staleness_ratio {t.staleness_ratio} trains on data up to {t.staleness_ratio - 1} "
                f"versions old, but buffer.max_staleness is {self.buffer.max_staleness}: raise it"
            )
        if t.mode == "async" and t.staleness_ratio != 1:
            raise ValueError(
                "train.staleness_ratio is for sync mode; async mode caps staleness with buffer.max_staleness"
            )
        if t.mode == "async" and self.buffer.max_staleness < t.sync_every - 1:
            raise ValueError(
                f"train.sync_every {t.sync_every} makes data at least {t.sync_every - 1} versions old, more than "
                f"buffer.max_staleness {self.buffer.max_staleness}: every batch would be dropped"
            )
        needed = t.groups_per_step * self.rollout.n * (t.staleness_ratio if t.mode == "sync" else 1)
        if self.buffer.capacity < needed:
            raise ValueError(f"buffer.capacity {self.buffer.capacity} is below one step's {needed} trajectories")
        if self.learner.temperature != self.rollout.temperature:
            self.learner.temperature = self.rollout.temperature  # the learner scores the engines' policy
        self.buffer.groups_per_step = t.groups_per_step

    @property
    def output(self) -> Path:
        return Path(self.train.output_dir)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return typed_config.load(RunConfig, path, overrides)


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """The `[CONFIG] [key=value ...]` positionals every `vespo` command that takes a run config shares."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def parse_config_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting `vespo CMD key=value` (no file) mean overrides of the embedded config."""
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)
        args.config = None
    return args
