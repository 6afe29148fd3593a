"""The `vespo` command. Subcommands are added as the components they drive land."""

from __future__ import annotations

import argparse
import sys

from vespo import demo, train

COMMANDS = {
    "demo": (demo.main, "objective demo: every objective on a stale toy policy (seconds, no model)"),
    "train": (train.main, "train: vespo train [CONFIG.yaml] [key=value ...] (no CONFIG: the embedded tiny run)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vespo", description="Fully asynchronous RL for LLMs with VESPO.")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    args = parser.parse_args(argv[:1])
    COMMANDS[args.command][0](argv[1:])
