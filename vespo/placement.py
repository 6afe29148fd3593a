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
from typing import Literal


class PlacementError(ValueError):
    """The requested layout does not fit the cluster; the message says what is short."""


@dataclass
class NodeGroup:
    name: str
    count: int = 1
    cpus: float = 2
    gpus: int = 0
    role: Literal["rollout", "learner", "shared"] = "shared"


@dataclass
class ClusterSpec:
    nodes: list[NodeGroup] = field(default_factory=lambda: [NodeGroup("local")])


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
    return Plan(slots)


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
