"""`vespo train [CONFIG] [key=value ...]`: the whole run, from config to checkpoint.

Without CONFIG the embedded default runs: the tiny model learning one-digit addition on
this machine, async mode, real vLLM, DeepSpeed, local Ray, wandb offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import NoReturn

from rich.console import Console

import configtypes
from vespo.config import run_config
from vespo.reporting.run_logger import RunLogger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo train", description=__doc__.split("\n\n")[0])
    run_config.add_config_arguments(
        parser, "YAML config file (default: the embedded tiny run)", "train.steps=10 learner.lr=1e-5"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run that train.output_dir holds (its checkpoints too)"
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a run from a checkpoint (a step directory, or a checkpoints root: its newest complete step); "
        "without CONFIG the run's own config is used, overrides apply on top (e.g. train.steps=1000)",
    )
    args = run_config.parse_config_arguments(parser, argv)
    from learner import checkpoint
    from vespo.orchestration import run_dir

    console = Console()
    found = None
    try:
        if args.resume:
            found = checkpoint.latest(args.resume)  # every file checked before anything starts
        if args.resume and not args.config:
            cfg = config_of_checkpoint(found, args.overrides)
        else:
            cfg = run_config.load(args.config, args.overrides)
        if found is not None:
            cfg.train.output_dir = str(checkpoint.checkpoint_root(found).parent)  # continue where it lies
        if not args.print_config:
            run_dir.check(cfg.output, overwrite=args.overwrite, resuming=found is not None)
    except checkpoint.CheckpointError as err:
        fail("cannot resume", err, 2)
    except (configtypes.ConfigError, ValueError, OSError) as err:
        fail("config error", err, 2)
    if args.print_config:
        import yaml

        console.print(yaml.safe_dump(configtypes.to_dict(cfg), sort_keys=False))
        return
    from vespo.config import preflight

    try:
        checked = preflight.check(cfg)
    except preflight.PreflightError as err:
        fail("error", err, 2)
    console.print(checked.summary(), soft_wrap=True, highlight=False, markup=False)
    from vespo.orchestration.controller import LearnerFailed
    from vespo.orchestration.reward_errors import RewardsFailing

    run_dir.claim(cfg.output, overwrite=args.overwrite, resuming=found is not None)
    try:
        summary = run(cfg, console, resume=found)
    except checkpoint.CheckpointError as err:
        fail("cannot resume", err, 2)
    except (LearnerFailed, RewardsFailing) as err:
        fail("run failed", err, 1)
    finally:
        run_dir.release(cfg.output)
    verb = f"stopped by {summary.stopped}" if summary.stopped else "done"
    console.print(
        f"[bold green]{verb}[/]: {summary.steps} steps in {summary.wall_s:.0f}s, reward "
        f"{_first_last(summary.rewards)}\n  checkpoint: {summary.checkpoint}\n  wandb: {summary.wandb}",
        soft_wrap=True,
        highlight=False,
    )
    if summary.stopped:
        console.print(f"  resume with: vespo train --resume {summary.checkpoint}", soft_wrap=True, highlight=False)
        sys.exit(128 + getattr(signal, summary.stopped, signal.SIGTERM).value)


def fail(what: str, err: BaseException, status: int) -> NoReturn:
    """One line on stderr (no traceback) and the exit status: 2 for bad input, 1 for a failed run."""
    Console(stderr=True).print(f"[red]{what}:[/] {err}", soft_wrap=True, highlight=False)
    sys.exit(status)


def config_of_checkpoint(path, overrides: list[str]) -> run_config.RunConfig:
    """The config a checkpointed run was started with (stored in it), with overrides on top,
    validated as a user's would be. A checkpoint is data, not a source of code: an import path
    it names (`task.reward_fn`) is used only when the user names it again."""
    import json
    from pathlib import Path

    from learner.checkpoint import CheckpointError, latest

    found = latest(path)
    try:
        data = json.loads((Path(found) / "controller" / "state.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{found}: its controller/state.json holds no readable config ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{found}: the config in controller/state.json is not a mapping")
    stored = (data.get("task") or {}).get("reward_fn") if isinstance(data.get("task"), dict) else None
    named = any(item.partition("=")[0].strip() == "task.reward_fn" for item in overrides)
    if stored and not named:
        raise configtypes.ConfigError(
            f"the checkpoint's config names task.reward_fn={stored}, code that would be imported and run; a "
            f"checkpoint is not trusted to choose code: name it yourself to use it (task.reward_fn={stored}) "
            "or pass a config file"
        )
    for item in overrides:
        configtypes.apply_override(data, item)
    return configtypes.build(run_config.RunConfig, data)


def run(cfg: run_config.RunConfig, console: Console | None = None, resume=None):
    """Run training to the end (or to a SIGTERM / Ctrl-C, which finish the current step and
    checkpoint); returns the RunSummary. Ray is left running if it was already up."""
    import ray

    from vespo.orchestration.controller import Controller

    console = console or Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # wandb files go under the run's directory unless the user chose a place; the stored config
    # keeps the default, so a resumed copy of the run logs into the copy
    wandb_cfg = dataclasses.replace(cfg.wandb, dir=str(cfg.output) if cfg.wandb.dir == "runs" else cfg.wandb.dir)
    was_up = ray.is_initialized()
    logger = RunLogger(wandb_cfg, configtypes.to_dict(cfg), console, total_steps=cfg.train.steps)
    controller = Controller(cfg, logger)
    console.print(f"[bold]vespo[/] {cfg.train.mode} run: {cfg.train.steps} steps, model {cfg.model}, "
                  f"task {cfg.task.name}, objective {cfg.learner.objective}; wandb: {logger.location}"
                  + (f"; resuming from {resume}" if resume else ""), soft_wrap=True)  # fmt: skip
    previous = {}
    try:
        controller.setup(resume=resume)
        previous = _stop_on_signals(controller, console)
        return controller.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        controller.shutdown()
        logger.finish()
        if not was_up and ray.is_initialized():
            ray.shutdown()


def _stop_on_signals(controller, console: Console) -> dict:
    """SIGTERM / SIGINT: finish the step, checkpoint, shut down. A second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if controller.stop_reason is not None:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        console.print(f"[yellow]{name}[/]: finishing the current step, then checkpoint and shut down "
                      "(send it again to stop at once)")  # fmt: skip
        controller.request_stop(name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _first_last(values: list[float]) -> str:
    if not values:
        return "n/a"
    k = max(1, len(values) // 5)
    return f"{sum(values[:k]) / k:.3f} (first {k} steps) -> {sum(values[-k:]) / k:.3f} (last {k})"
