"""`vespo submit`: send a run to a Ray cluster with `ray job submit`, print the job id and how
to follow it.

The job runs `python -m vespo train CONFIG [overrides]` on the cluster with the project as
its working directory (uploaded by Ray, minus what deploy/runtime_env.yaml excludes). The
config is checked here first, so a typo fails in a second on the laptop, not minutes later
on the cluster. Secrets are not forwarded: set WANDB_API_KEY in the nodes' environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console

import configtypes
from vespo.config import run_config

ROOT = Path(__file__).resolve().parents[2]  # the project: the job's working_dir
DEFAULT_RUNTIME_ENV = ROOT / "deploy" / "runtime_env.yaml"


def ray_cli() -> str:
    """The `ray` next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "ray"
    found = str(local) if local.exists() else shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command was not found; install the project (make test sets up .venv)")
    return found


def client_env() -> dict[str, str]:
    """The environment for Ray's job CLI. Ray 2.60 clusters enable token auth when a token exists
    (~/.ray/auth_token), but the job CLI only sends it with RAY_AUTH_MODE=token: set that when a
    token is at hand and the user has not chosen a mode."""
    env = dict(os.environ)
    has_token = (
        env.get("RAY_AUTH_TOKEN")
        or Path(env.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser().exists()
    )
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"
    return env


def job_config_path(config: str | None) -> str | None:
    """The config as the job will see it: relative to the working_dir when it lives in the
    project (it is uploaded with it), else an absolute path the cluster must be able to read."""
    if config is None:
        return None
    path = Path(config).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def build_command(args: argparse.Namespace, submission_id: str) -> list[str]:
    entrypoint = [args.python, "-m", "vespo", "train"]
    if args.config:
        entrypoint.append(job_config_path(args.config))
    entrypoint += args.overrides
    cmd = [ray_cli(), "job", "submit", "--address", args.address, "--submission-id", submission_id]
    cmd += ["--runtime-env", str(Path(args.runtime_env).resolve())]
    if args.entrypoint_num_cpus:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if not args.follow:
        cmd.append("--no-wait")
    return [*cmd, "--", *entrypoint]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo submit", description=__doc__.split("\n\n")[0])
    run_config.add_config_arguments(
        parser, "YAML run config inside the project (default: the embedded run)", "train.steps=10"
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
        help="the cluster's job server (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    parser.add_argument("--runtime-env", default=str(DEFAULT_RUNTIME_ENV), help="runtime env YAML (working_dir etc.)")
    parser.add_argument("--submission-id", help="job id to use (default: vespo-<time>-<random>)")
    parser.add_argument("--python", default="python", help="the interpreter on the cluster nodes (default: python)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=0, help="CPUs reserved for the driver")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    parser.add_argument("--dry-run", action="store_true", help="print the ray job submit command and exit")
    args = run_config.parse_config_arguments(parser, argv)
    console = Console()
    try:
        cfg = run_config.load(args.config, args.overrides)  # fail here, not on the cluster
        if not Path(args.runtime_env).exists():
            raise FileNotFoundError(f"runtime env file {args.runtime_env} not found")
        submission_id = args.submission_id or f"vespo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        cmd = build_command(args, submission_id)
    except (configtypes.ConfigError, ValueError, OSError) as err:
        console.print(f"[red]submit error:[/] {err}", soft_wrap=True)
        sys.exit(2)
    if args.dry_run:
        print(subprocess.list2cmdline(cmd))
        return
    console.print(
        f"submitting {cfg.train.mode} run ({cfg.train.steps} steps, model {cfg.model}) to {args.address} ...",
        soft_wrap=True,
    )
    env = client_env()
    result = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        console.print(
            f"[red]ray job submit failed[/] (exit {result.returncode}); is a Ray job server at {args.address}?"
        )
        sys.exit(result.returncode)
    ray = ray_cli()
    if env.get("RAY_AUTH_MODE") and "RAY_AUTH_MODE" not in os.environ:
        ray = f"RAY_AUTH_MODE={env['RAY_AUTH_MODE']} {ray}"
    console.print(
        f"job id: [bold]{submission_id}[/]\n"
        f"  follow:  {ray} job logs --address {args.address} --follow {submission_id}\n"
        f"  status:  {ray} job status --address {args.address} {submission_id}\n"
        f"  stop:    {ray} job stop --address {args.address} {submission_id}\n"
        f"  results: {cfg.train.output_dir} on the node that ran the driver (checkpoints, wandb files)",
        soft_wrap=True,
        highlight=False,
    )


if __name__ == "__main__":
    main()
