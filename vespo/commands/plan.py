"""`vespo plan`: the placement plan of a run on a cluster, printed without starting anything.

A 64-GPU run that does not fit should fail on a laptop in a second, not after the cluster has
come up. The cluster comes from a Ray cluster launcher config (deploy/cluster.yaml), a plain
`nodes:` list, or, with neither, this machine. `--model NAME` adds what that model costs the
layout: learner memory per rank, broadcast bytes, decode and training FLOPs
(vespo/config/model_profile.py); with learner.lora set (`learner.lora.rank=16`), those of
training the adapter alone and syncing only it.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

import configtypes
from vespo.config import model_profile, run_config
from vespo.config.placement import (
    ClusterSpec,
    NodeGroup,
    PlacementError,
    Plan,
    cluster_from_file,
    cpus_needed,
    demand_of,
    plan,
)  # fmt: skip
from weightsync.transport import backend_for


def local_cluster(cfg: run_config.RunConfig) -> ClusterSpec:
    """This machine as a local run sees it (logical CPUs raised to what the layout asks for,
    as vespo train does: the actors then share the cores)."""
    import torch

    need = cpus_needed(cfg)
    return ClusterSpec([NodeGroup("local", 1, max(float(os.cpu_count() or 1), need), torch.cuda.device_count())])


def describe(cfg: run_config.RunConfig, p: Plan) -> str:
    engines, ranks = p.of("engine"), p.of("learner")
    rank_nodes = {(s.group, s.node) for s in ranks}
    engine_nodes = {(s.group, s.node) for s in engines}
    receivers = len(engines) * cfg.rollout.tensor_parallel_size
    backend = backend_for("cuda" if cfg.learner.num_gpus_per_worker > 0 else "cpu")
    lines = [
        p.by_node(),
        "",
        f"rollout: {len(engines)} vLLM engine(s) x TP {cfg.rollout.tensor_parallel_size} on {len(engine_nodes)} "
        f"node(s), {sum(s.gpus for s in engines)} GPU(s)",
        f"learner: DeepSpeed ZeRO-{cfg.learner.zero_stage}, world size {len(ranks)} across {len(rank_nodes)} "
        f"node(s), {sum(s.gpus for s in ranks)} GPU(s)"
        + (f", LoRA rank {cfg.learner.lora.rank} (syncs send the adapter only)" if cfg.learner.lora else ""),
        f"weight group: {backend}, world size {receivers + 1} (learner rank 0 + one receiver per engine shard), "
        f"buckets of {cfg.train.weight_bucket_mb} MB",
        f"mode: {cfg.train.mode}"
        + (f", staleness ratio N = {cfg.train.staleness_ratio}" if cfg.train.mode == "sync" else "")
        + f", buffer.max_staleness {cfg.buffer.max_staleness}",
    ]
    shared = engine_nodes & rank_nodes
    if shared:
        lines.append(f"note: engines and learner ranks share {len(shared)} node(s); fine for small runs")
    return "\n".join(lines)


def model_lines(cfg: run_config.RunConfig, p: Plan, profile: model_profile.ModelProfile) -> list[str]:
    """What the model costs this layout (model_profile.describe), from the config's learner and rollout."""
    learner, rollout = cfg.learner, cfg.rollout
    sequences = cfg.train.groups_per_step * rollout.n
    lora = learner.lora
    adapter = None if lora is None else model_profile.Adapter.of(profile, lora.rank, lora.target_modules)
    return model_profile.describe(
        profile, zero_stage=learner.zero_stage, ranks=len(p.of("learner")), bf16=learner.bf16,
        micro_batch_tokens=learner.micro_batch_tokens, tp=rollout.tensor_parallel_size,
        receivers=len(p.of("engine")) * rollout.tensor_parallel_size, step_tokens=sequences * rollout.max_model_len,
        step_note=f"at most: {sequences} sequences of rollout.max_model_len {rollout.max_model_len}", adapter=adapter,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vespo plan", description=__doc__.split("\n\n")[0])
    run_config.add_config_arguments(parser, "YAML run config (default: the embedded tiny run)", "train.num_engines=8")
    parser.add_argument("--cluster", help="Ray cluster launcher YAML or a nodes: list (default: this machine)")
    parser.add_argument(
        "--model",
        choices=sorted(model_profile.PROFILES),
        help="also print what this model costs the layout: memory per rank, broadcast, FLOPs",
    )
    args = run_config.parse_config_arguments(parser, argv)
    console = Console()
    try:
        cfg = run_config.load(args.config, args.overrides)
        cluster = cluster_from_file(args.cluster) if args.cluster else local_cluster(cfg)
        p = plan(cluster, demand_of(cfg, driver_cpus=1 if args.cluster else 0))  # the driver: 1 CPU of the head
    except (configtypes.ConfigError, PlacementError, ValueError, OSError) as err:
        console.print(f"[red]plan error:[/] {err}", soft_wrap=True)
        sys.exit(2)
    where = args.cluster or "this machine"
    console.print(f"[bold]placement plan[/] for {args.config or 'the embedded run'} on {where}:", soft_wrap=True)
    console.print(describe(cfg, p), soft_wrap=True, highlight=False)
    if args.model:
        console.print("\n".join(model_lines(cfg, p, model_profile.PROFILES[args.model])), soft_wrap=True,
                      highlight=False, markup=False)  # fmt: skip


if __name__ == "__main__":
    main()
