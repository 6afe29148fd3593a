"""Metrics out of the run: wandb (online, offline or disabled) plus a console line per step.

wandb is imported lazily and only when enabled, so a disabled run neither needs an account
nor starts wandb's service process. Configs are logged with anything that looks like a
secret removed; API keys come from the environment and are never written by us.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
HEADLINE = ("reward/mean", "actor/loss", "staleness/token_max", "buffer/occupancy", "perf/train_tokens_per_s")


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "vespo"
    entity: str | None = None
    run_name: str | None = None
    dir: str = "runs"  # wandb writes under {dir}/wandb


def redact(config: Any) -> Any:
    """The config without values under secret-looking keys."""
    if isinstance(config, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) else redact(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


class RunLogger:
    def __init__(self, cfg: WandbConfig, run_config: dict[str, Any], console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console()
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
        shown = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in HEADLINE if k in metrics)
        self.console.print(f"[bold]step {step}[/]  {shown}")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
