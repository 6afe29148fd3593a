"""Where the run's actors go: a placement plan from a cluster description, checked before start.

Rollout engines and learner ranks compete for the same GPUs and CPUs. The plan puts each on
a node group (engines on "rollout" or shared nodes, learner ranks on "learner" or shared
nodes, as in the paper's 48 rollout + 16 train GPU layout), never splits an engine's tensor-
parallel group across nodes, and says plainly what does not fit. The same plan becomes Ray
placement-group bundles when the run starts, and is printed by `vespo plan` without
starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

import configtypes
from configtypes import AtLeast0, AtLeast1, ConfigError, NonEmpty, NonNegative, section

# Custom Ray resources that mark node groups (deploy/cluster.yaml sets them per node type): when
# the cluster has them, engines and learner ranks request a sliver, which pins them to their group.
ROLE_RESOURCES = {"rollout": "vespo_rollout", "learner": "vespo_learner"}


class PlacementError(ValueError):
    """The requested layout does not fit the cluster; the message says what is short."""


@section()
class NodeGroup:
    name: NonEmpty
    count: AtLeast1 = 1  # nodes of this kind
    cpus: NonNegative = 2  # per node
    gpus: AtLeast0 = 0  # per node
    role: Literal["rollout", "learner", "shared"] = "shared"


@section()
class ClusterSpec:
    # the first group's first node hosts the driver
    nodes: Annotated[list[NodeGroup], Field(min_length=1)] = field(default_factory=lambda: [NodeGroup("local")])

    def __post_init__(self) -> None:
        names = [g.name for g in self.nodes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # the plan tells groups apart by name
            raise ConfigError(f"nodes: node group names must differ, {', '.join(map(repr, twice))} is used twice")


@dataclass
class Demand:
    engines: int = 1
    tensor_parallel: int = 1  # GPUs per engine (ignored without GPUs)
    cpus_per_engine: float = 1
    learner_ranks: int = 1
    gpus_per_rank: int = 0
    cpus_per_rank: float = 1
    driver_cpus: float = 0  # the controller and the buffer actor


@dataclass
class Slot:
    kind: Literal["engine", "learner"]
    index: int
    group: str
    node: int
    cpus: float
    gpus: int


@dataclass
class Plan:
    slots: list[Slot]
    cluster: ClusterSpec | None = None

    def of(self, kind: str) -> list[Slot]:
        return [s for s in self.slots if s.kind == kind]

    def bundles(self, kind: str) -> list[dict[str, float]]:
        """Ray placement-group bundles, one per actor of this kind."""
        return [{"CPU": s.cpus, **({"GPU": float(s.gpus)} if s.gpus else {})} for s in self.of(kind)]

    def describe(self) -> str:
        lines = [f"{'actor':<12} {'node group':<12} {'node':>4} {'CPUs':>5} {'GPUs':>5}"]
        for s in self.slots:
            lines.append(f"{s.kind + ' ' + str(s.index):<12} {s.group:<12} {s.node:>4} {s.cpus:>5g} {s.gpus:>5}")
        engines, ranks = self.of("engine"), self.of("learner")
        lines.append(
            f"{len(engines)} engine(s) on {sum(s.gpus for s in engines)} GPU(s), "
            f"{len(ranks)} learner rank(s) on {sum(s.gpus for s in ranks)} GPU(s)"
        )
        return "\n".join(lines)

    def by_node(self) -> str:
        """One line per node: what runs there and what is left, the view a dry run needs."""
        if self.cluster is None:
            return ""
        lines = [f"{'node':<16} {'role':<8} {'engines':>7} {'ranks':>5} {'GPUs used':>10} {'CPUs used':>10}"]
        for g in self.cluster.nodes:
            for n in range(g.count):
                here = [s for s in self.slots if s.group == g.name and s.node == n]
                engines = sum(s.kind == "engine" for s in here)
                ranks = sum(s.kind == "learner" for s in here)
                gpus, cpus = sum(s.gpus for s in here), sum(s.cpus for s in here)
                lines.append(
                    f"{g.name + '[' + str(n) + ']':<16} {g.role:<8} {engines:>7} {ranks:>5} "
                    f"{f'{gpus}/{g.gpus}':>10} {f'{cpus:g}/{g.cpus:g}':>10}"
                )
        return "\n".join(lines)


def plan(cluster: ClusterSpec, demand: Demand) -> Plan:
    free = {(g.name, n): [g.cpus, g.gpus] for g in cluster.nodes for n in range(g.count)}
    free[(cluster.nodes[0].name, 0)][0] -= demand.driver_cpus
    roles = {g.name: g.role for g in cluster.nodes}
    slots = []
    engine_gpus = demand.tensor_parallel if demand.gpus_per_rank or _any_gpu(cluster) else 0
    # Learner first: DeepSpeed ranks want to be packed, and their nodes are the scarcer kind.
    for kind, count, cpus, gpus, role in (
        ("learner", demand.learner_ranks, demand.cpus_per_rank, demand.gpus_per_rank, "learner"),
        ("engine", demand.engines, demand.cpus_per_engine, engine_gpus, "rollout"),
    ):
        for i in range(count):
            node = _first_fit(free, roles, role, cpus, gpus)
            if node is None:
                raise PlacementError(_shortfall(cluster, demand, kind, i, count, cpus, gpus, role))
            free[node][0] -= cpus
            free[node][1] -= gpus
            slots.append(Slot(kind, i, node[0], node[1], cpus, gpus))  # type: ignore[arg-type]
    return Plan(slots, cluster)


def _first_fit(free, roles, role, cpus, gpus):
    for preferred in (role, "shared"):
        for node, (c, g) in free.items():
            if roles[node[0]] == preferred and c >= cpus - 1e-9 and g >= gpus:
                return node
    return None


def _any_gpu(cluster: ClusterSpec) -> bool:
    return any(g.gpus for g in cluster.nodes)


def _shortfall(cluster, demand, kind, i, count, cpus, gpus, role) -> str:
    usable = [g for g in cluster.nodes if g.role in (role, "shared")]
    total_cpus = sum(g.cpus * g.count for g in usable)
    total_gpus = sum(g.gpus * g.count for g in usable)
    need = f"{cpus:g} CPU" + (f" + {gpus} GPU" if gpus else "")
    return (
        f"cannot place {kind} {i + 1} of {count} (each needs {need} on one node): node groups for {role} work "
        f"({', '.join(g.name for g in usable) or 'none'}) have {total_cpus:g} CPUs and {total_gpus} GPUs in all, "
        f"with {demand.engines} engine(s) x {demand.cpus_per_engine:g} CPU and {demand.learner_ranks} learner "
        f"rank(s) x {demand.cpus_per_rank:g} CPU requested. Lower the counts or add nodes."
    )


def demand_of(cfg: Any, driver_cpus: float = 0) -> Demand:
    """The layout a run config asks for (engines, tensor parallel, learner ranks)."""
    return Demand(
        engines=cfg.train.num_engines, tensor_parallel=cfg.rollout.tensor_parallel_size,
        cpus_per_engine=cfg.rollout.num_cpus, learner_ranks=cfg.learner.world_size,
        gpus_per_rank=int(cfg.learner.num_gpus_per_worker), cpus_per_rank=cfg.learner.num_cpus_per_worker,
        driver_cpus=driver_cpus,
    )  # fmt: skip


def _role_of(resources: dict[str, Any]) -> str:
    for role, name in ROLE_RESOURCES.items():
        if resources.get(name):
            return role
    return "shared"


def cluster_from_file(path: str | Path) -> ClusterSpec:
    """A cluster description from YAML: either a Ray cluster launcher config (node types from
    `available_node_types`, `max_workers` of each, roles from the vespo_* custom resources) or
    a plain `nodes:` list of {name, count, cpus, gpus, role}, checked like a run config."""
    data = configtypes.read_yaml(path)
    try:
        if "available_node_types" in data:
            return cluster_from_launcher(data)
        if "nodes" in data:
            return configtypes.build(ClusterSpec, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    raise PlacementError(f"{path}: expected a Ray cluster launcher config (available_node_types) or a nodes: list")


def cluster_from_launcher(data: dict[str, Any]) -> ClusterSpec:
    head = data.get("head_node_type")
    groups = []
    for name, node_type in data["available_node_types"].items():
        resources = node_type.get("resources") or {}
        if "CPU" not in resources:
            raise PlacementError(
                f"node type {name!r} does not declare resources.CPU; the dry run needs CPU (and GPU) counts"
            )
        count = (1 if name == head else 0) + int(node_type.get("max_workers", node_type.get("min_workers", 0)))
        if count:
            groups.append(
                NodeGroup(name, count, float(resources["CPU"]), int(resources.get("GPU", 0)), _role_of(resources))
            )  # type: ignore[arg-type]  # noqa: E501
    if head in data["available_node_types"]:  # the head first: the driver's CPUs come off it
        groups.sort(key=lambda g: g.name != head)
    return ClusterSpec(groups)


def cluster_from_ray(nodes: list[dict[str, Any]]) -> ClusterSpec:
    """The live cluster (`ray.nodes()`), one group per node."""
    return ClusterSpec(
        [
            NodeGroup(
                f"node{i}", 1, n["Resources"].get("CPU", 0), int(n["Resources"].get("GPU", 0)), _role_of(n["Resources"])
            )  # type: ignore[arg-type]  # noqa: E501
            for i, n in enumerate(x for x in nodes if x.get("Alive"))
        ]
    )


def role_options(cluster_resources: dict[str, float], role: str) -> dict[str, Any]:
    """Ray actor options that keep an actor on its node group, where the cluster marks groups."""
    name = ROLE_RESOURCES[role]
    return {"resources": {name: 0.001}} if cluster_resources.get(name) else {}


def cpus_needed(cfg: Any) -> float:
    """CPUs the run's actors ask Ray for in all (engines and learner ranks)."""
    d = demand_of(cfg)
    return d.engines * d.cpus_per_engine + d.learner_ranks * d.cpus_per_rank


def check_cores(cfg: Any) -> None:
    """Named cores must be one list per engine / rank, as many as Ray is told each uses, and
    never shared between two of them (pinning two roles to one core is the contention it
    is there to prevent)."""
    owners: dict[int, str] = {}
    for key, lists, count, cpus in (
        ("rollout.cpu_cores", cfg.rollout.cpu_cores, cfg.train.num_engines, cfg.rollout.num_cpus),
        ("learner.cpu_cores", cfg.learner.cpu_cores, cfg.learner.world_size, cfg.learner.num_cpus_per_worker),
    ):
        if not lists:
            continue
        per = "train.num_engines" if key.startswith("rollout") else "learner.world_size"
        share = "rollout.num_cpus" if key.startswith("rollout") else "learner.num_cpus_per_worker"
        if len(lists) != count:
            raise ConfigError(f"{key} has {len(lists)} core list(s) but {per} is {count}: give one list each")
        for i, cores in enumerate(lists):
            if len(set(cores)) != cpus:
                raise ConfigError(
                    f"{key}[{i}] names {len(set(cores))} core(s) but {share} is {cpus:g}: Ray's CPU accounting "
                    "must agree with the cores each actor holds"
                )
            for c in cores:
                if c in owners and owners[c] != f"{key}[{i}]":
                    raise ConfigError(f"{key}[{i}] and {owners[c]} both name core {c}: each core has one owner")
                owners[c] = f"{key}[{i}]"


def assign_cores(available: list[int], engines: int, cpus_per_engine: float, ranks: int,
                 cpus_per_rank: float) -> tuple[list[list[int]], list[list[int]]] | str:  # fmt: skip
    """Disjoint cores for every engine and learner rank, as many as Ray counts for each: engines
    from the first core up, ranks from the last down, what is left (if any) for the driver and
    the buffer. Returns why not instead, when the counts are fractional or do not fit."""
    if any(c != int(c) or c < 1 for c in (cpus_per_engine, cpus_per_rank)):
        return (
            f"rollout.num_cpus {cpus_per_engine:g} / learner.num_cpus_per_worker {cpus_per_rank:g} are not whole cores"
        )
    e, r = int(cpus_per_engine), int(cpus_per_rank)
    need = engines * e + ranks * r
    if need > len(available):
        return f"{engines} engine(s) x {e} + {ranks} rank(s) x {r} cores need {need}, this machine has {len(available)}"
    cores = sorted(available)
    engine_cores = [cores[i * e : (i + 1) * e] for i in range(engines)]
    rank_cores = [cores[len(cores) - (i + 1) * r : len(cores) - i * r] for i in range(ranks)]
    return engine_cores, rank_cores
