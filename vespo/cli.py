"""The `vespo` command: one line per subcommand, each living in vespo/commands/."""

from __future__ import annotations

import argparse
import sys

from vespo.commands import demo, evaluate, plan, submit, train, word_problems

COMMANDS = {
    "demo": (demo.main, "objective demo: every objective on a stale toy policy (seconds, no model)"),
    "train": (train.main, "train: vespo train [CONFIG.yaml] [key=value ...] (no CONFIG: the embedded tiny run)"),
    "eval": (evaluate.main, "score a model or checkpoint on the held-out split: vespo eval [CONFIG] --checkpoint DIR"),
    "plan": (plan.main, "dry run: where every actor of CONFIG would go on a cluster (--cluster FILE)"),
    "submit": (submit.main, "send CONFIG to a Ray cluster with ray job submit (--address URL)"),
    "word-problems": (word_problems.main, "write the word-problem dataset as veRL-schema Parquet (PATH --rows N)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vespo", description="Fully asynchronous RL for LLMs with VESPO.")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    args = parser.parse_args(argv[:1])
    COMMANDS[args.command][0](argv[1:])
