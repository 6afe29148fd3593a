"""`vespo train [CONFIG] [key=value ...]`: the whole run, from config to checkpoint.

Without CONFIG the embedded default runs: the tiny model learning one-digit addition on
this machine, async mode, real vLLM, DeepSpeed, local Ray, wandb offline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console

from vespo import run_config, typed_config
from vespo.run_logger import RunLogger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML config file (default: the embedded tiny run)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 learner.lr=1e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)  # `vespo train key=value` without a file
        args.config = None
    console = Console()
    try:
        cfg = run_config.load(args.config, args.overrides)
    except (typed_config.ConfigError, ValueError) as err:
        console.print(f"[red]config error:[/] {err}")
        sys.exit(2)
    if args.print_config:
        import yaml

        console.print(yaml.safe_dump(typed_config.to_dict(cfg), sort_keys=False))
        return
    summary = run(cfg, console)
    console.print(
        f"[bold green]done[/]: {summary.steps} steps in {summary.wall_s:.0f}s, reward "
        f"{_first_last(summary.rewards)}\n  checkpoint: {summary.checkpoint}\n  wandb: {summary.wandb}",
        soft_wrap=True,
        highlight=False,
    )


def run(cfg: run_config.RunConfig, console: Console | None = None):
    """Run training to the end; returns the RunSummary. Ray is left running if it was already up."""
    import ray

    from vespo.controller import Controller

    console = console or Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg.wandb.dir = cfg.wandb.dir if cfg.wandb.dir != "runs" else str(cfg.output)
    was_up = ray.is_initialized()
    logger = RunLogger(cfg.wandb, typed_config.to_dict(cfg), console, total_steps=cfg.train.steps)
    controller = Controller(cfg, logger)
    console.print(f"[bold]vespo[/] {cfg.train.mode} run: {cfg.train.steps} steps, model {cfg.model}, "
                  f"task {cfg.task.name}, objective {cfg.learner.objective}; wandb: {logger.location}",
                  soft_wrap=True)  # fmt: skip
    try:
        controller.setup()
        return controller.run()
    finally:
        controller.shutdown()
        logger.finish()
        if not was_up and ray.is_initialized():
            ray.shutdown()


def _first_last(values: list[float]) -> str:
    if not values:
        return "n/a"
    k = max(1, len(values) // 5)
    return f"{sum(values[:k]) / k:.3f} (first {k} steps) -> {sum(values[-k:]) / k:.3f} (last {k})"
