"""The whole run's configuration: one typed tree, loaded from YAML plus dotted overrides.

Every section is the component's own config dataclass (rollout, learner, buffer, task); `train`
holds what belongs to the controller and `wandb` what the run logger needs. Each key has one
default, in its section class; the embedded run's own settings are a YAML file (embedded.yaml)
like any other run's. Cross-section rules (impossible combinations) are checked here, once,
with messages that say which keys to change.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

import configtypes
from buffer.config import BufferConfig
from configtypes import AtLeast0, AtLeast1, ConfigError, NonEmpty, Positive, section
from learner.config import LearnerConfig
from rollout.config import RolloutConfig
from rollout.tasks.base import TaskConfig
from vespo.config import placement

# the embedded default run (`vespo train` with no config): the tiny model learns one-digit addition
EMBEDDED = Path(__file__).with_name("embedded.yaml")


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters wandb refuses in a project name


def _project_name(name: str) -> str:
    """wandb would refuse the name only when the run starts; say so before anything starts."""
    if any(c in name for c in WANDB_PROJECT_FORBIDDEN):
        raise ValueError(f"must not contain any of {' '.join(WANDB_PROJECT_FORBIDDEN)}, got {name!r}")
    return name


ProjectName = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_project_name)]


@section("wandb")
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: ProjectName = "vespo"
    entity: NonEmpty | None = None  # None: the account's default entity
    run_name: NonEmpty | None = None  # None: wandb picks one
    dir: NonEmpty = "runs"  # wandb writes under {dir}/wandb


@section("train")
class TrainConfig:
    mode: Literal["async", "sync"] = "async"
    # sync: each rollout batch of staleness_ratio * groups_per_step groups is split into
    # staleness_ratio sequential updates (the paper's N); 1 is plain on-policy training
    staleness_ratio: AtLeast1 = 1
    steps: AtLeast1 = 500  # learner steps (optimizer updates)
    groups_per_step: AtLeast1 = 32  # prompts per learner step; each brings rollout.n samples
    sync_every: AtLeast1 = 1  # learner steps between weight broadcasts (async mode)
    num_engines: AtLeast1 = 1  # rollout engine actors
    max_inflight_groups: AtLeast1 = 32  # per engine: prompts being generated at once (async mode)
    weight_bucket_mb: AtLeast1 = 64  # size of one weight-broadcast bucket
    recompute_old_logprobs: bool = False  # learner recomputes pi_old (train/inference mismatch correction)
    eval_every: AtLeast0 = 50  # learner steps between held-out evaluations; 0 disables
    eval_prompts: AtLeast1 = 64
    eval_log_samples: AtLeast0 = 4  # sampled responses (prompt, response, reward) logged at each evaluation
    checkpoint_every: AtLeast0 = 0  # learner steps between checkpoints; 0: only at the end
    output_dir: NonEmpty = "runs/vespo"  # checkpoints and wandb files go under it
    batch_timeout_s: Positive = 600.0  # the learner gives up waiting for a batch after this long
    engine_restart_timeout_s: Positive = 600.0  # how long a dead engine may take to come back (Ray restart + start)
    group_retries: AtLeast0 = 2  # a group that fails inside a live engine is handed out again this often, then dropped
    keep_checkpoints: AtLeast0 = 3  # complete checkpoints kept (the newest); 0 keeps all
    # on a one-machine CPU cluster each engine and learner rank gets cores of its own
    # (placement.assign_cores), unless rollout.cpu_cores / learner.cpu_cores name them; false: none pinned
    pin_cores: bool = True
    ray_address: NonEmpty | None = None  # None: start a local Ray (or use RAY_ADDRESS / an initialised Ray)


@section()
class RunConfig:
    # a local Hugging Face model directory, or a named model (vespo.models: tiny, tiny-long, smollm2-135m)
    model: NonEmpty = "tiny"
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        t, max_staleness = self.train, self.buffer.max_staleness
        if t.mode == "sync" and t.sync_every != 1:
            raise ConfigError("train.sync_every applies to async mode; in sync mode use train.staleness_ratio")
        if t.mode == "sync" and max_staleness < t.staleness_ratio - 1:
            raise ConfigError(
                f"sync mode with train.staleness_ratio {t.staleness_ratio} trains on data up to "
                f"{t.staleness_ratio - 1} versions old, but buffer.max_staleness is {max_staleness}: raise it"
            )
        if t.mode == "sync" and self.buffer.divergence_budget is not None:
            raise ConfigError("buffer.divergence_budget applies to async mode; sync rounds train what they generated")
        if t.mode == "async" and t.staleness_ratio != 1:
            raise ConfigError(
                "train.staleness_ratio is for sync mode; async mode caps staleness with buffer.max_staleness"
            )
        if t.mode == "async" and max_staleness < t.sync_every - 1:
            raise ConfigError(
                f"train.sync_every {t.sync_every} makes data at least {t.sync_every - 1} versions old, more than "
                f"buffer.max_staleness {max_staleness}: every batch would be dropped"
            )
        needed = t.groups_per_step * self.rollout.n * (t.staleness_ratio if t.mode == "sync" else 1)
        if self.buffer.capacity < needed:
            raise ConfigError(
                f"buffer.capacity {self.buffer.capacity} is below one step's {needed} trajectories "
                "(train.groups_per_step x rollout.n, x train.staleness_ratio in sync mode)"
            )
        placement.check_cores(self)
        if self.rollout.temperature > 0:  # 0 is greedy evaluation: no policy for a learner to score
            self.learner = configtypes.derive(
                self.learner, "temperature", self.rollout.temperature, "rollout.temperature",
                "the learner scores the engines' policy",
            )  # fmt: skip
        self.rollout = configtypes.derive(
            self.rollout, "lora_rank", self.learner.lora.rank if self.learner.lora else 0, "learner.lora.rank",
            "the engines serve the learner's adapter",
        )  # fmt: skip
        self.buffer = configtypes.derive(
            self.buffer, "groups_per_step", t.groups_per_step, "train.groups_per_step",
            "admission counts the groups the learner takes per step",
        )  # fmt: skip

    @property
    def output(self) -> Path:
        return Path(self.train.output_dir)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file plus dotted overrides; no file is the embedded run (EMBEDDED).
    A key the file leaves out takes its section's one default."""
    return configtypes.load(RunConfig, EMBEDDED if path is None else path, overrides)


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
