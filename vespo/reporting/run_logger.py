"""Metrics out of the run: wandb (online, offline or disabled) plus console progress.

The console shows a live progress bar (step, elapsed, ETA, the headline numbers) when it is a
terminal, and in every case a headline line about 50 times a run and at every evaluation, so
a log file or `ray job logs` shows progress without 500 lines of it.

wandb is imported lazily and only when enabled, so a disabled run neither needs an account
nor starts wandb's service process. Configs are logged with anything that looks like a
secret removed; API keys come from the environment and are never written by us.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vespo.config.run_config import WandbConfig

SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
# (metric, console label)
HEADLINE = (
    ("reward/mean", "reward"),
    ("eval/accuracy", "eval_acc"),
    ("actor/loss", "loss"),
    ("staleness/token_max", "stale_max"),
    ("divergence/staleness_cap", "kl_cap"),  # only under buffer.divergence_budget
    ("buffer/occupancy", "buffer"),
    ("perf/gen_tokens_per_s", "gen_tok/s"),
    ("perf/train_tokens_per_s", "train_tok/s"),
)
def redact(config: Any) -> Any:
    """The config without values under secret-looking keys."""
    if isinstance(config, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) else redact(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


class RunLogger:
    def __init__(
        self,
        cfg: WandbConfig,
        run_config: dict[str, Any],
        console: Console | None = None,
        total_steps: int | None = None,
    ):
        self.cfg = cfg
        self.console = console or Console()
        self.total_steps = total_steps
        self.print_every = max(1, (total_steps or 1) // 50)
        self.started = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first log: the ETA's base
        self.progress: Progress | None = None
        self._task = None
        if total_steps and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[headline]}"),
                console=self.console, transient=True,
            )  # fmt: skip
            self._task = self.progress.add_task("train", total=total_steps, headline="starting")
            self.progress.start()
        self.run = None
        if cfg.mode != "disabled":
            import wandb

            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name,
                dir=cfg.dir,
                mode=cfg.mode,
                config=redact(run_config),
            )

    @property
    def location(self) -> str:
        """Where the run's data is: a URL online, a directory offline."""
        if self.run is None:
            return "wandb disabled"
        return self.run.url if self.cfg.mode == "online" and self.run.url else str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, float], step: int, histograms: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            payload: dict[str, Any] = dict(metrics)
            if histograms:
                import wandb

                for key, values in histograms.items():
                    if len(values):
                        payload[key] = wandb.Histogram(np.asarray(values))
            self.run.log(payload, step=step)
        if self._first is None:
            self._first = (step, time.monotonic())
        shown = "  ".join(f"{label}={metrics[key]:.4g}" for key, label in HEADLINE if key in metrics)
        if self.progress is not None:
            self.progress.update(self._task, completed=step, headline=shown)
        last = self.total_steps is not None and step >= self.total_steps
        if step % self.print_every == 0 or last or step == 1 or any(k.startswith("eval/") for k in metrics):
            self.console.print(f"[bold]step {step}{self._of_total(step)}[/]  {shown}", soft_wrap=True)

    def log_examples(self, key: str, step: int, items: list) -> None:
        """Sampled responses (vespo.reporting.examples.Example) as a wandb table, and the first on the console."""
        from vespo.reporting import examples

        if not items:
            return
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=examples.COLUMNS, data=examples.rows(step, items))}, step=step)
        self.console.print(f"  sample at step {step}: {examples.one_line(items[0])}", soft_wrap=True, highlight=False,
                           markup=False)  # fmt: skip

    def _of_total(self, step: int) -> str:
        if not self.total_steps:
            return ""
        now = time.monotonic()
        first_step, first_time = self._first or (step, now)
        # the rate since the first logged step: start-up (engines, learner) is not a step
        rate = (now - first_time) / (step - first_step) if step > first_step else None
        eta = _clock(rate * (self.total_steps - step)) if rate is not None else "?"
        return f"/{self.total_steps} ({_clock(now - self.started)} elapsed, eta {eta})"

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
