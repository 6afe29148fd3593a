import pytest

from vespo.config.placement import ClusterSpec, Demand, NodeGroup, PlacementError, plan


def paper_cluster() -> ClusterSpec:
    return ClusterSpec(
        [
            NodeGroup("head", 1, cpus=16),
            NodeGroup("rollout", 6, 96, 8, "rollout"),
            NodeGroup("train", 2, 96, 8, "learner"),
        ]
    )


def test_paper_layout_48_rollout_and_16_train_gpus():
    demand = Demand(
        engines=24, tensor_parallel=2, cpus_per_engine=8, learner_ranks=16, gpus_per_rank=1, cpus_per_rank=8
    )
    p = plan(paper_cluster(), demand)
    engines, ranks = p.of("engine"), p.of("learner")
    assert {s.group for s in engines} == {"rollout"} and {s.group for s in ranks} == {"train"}
    assert sum(s.gpus for s in engines) == 48 and sum(s.gpus for s in ranks) == 16
    per_node = {}
    for s in engines:
        per_node[(s.group, s.node)] = per_node.get((s.group, s.node), 0) + s.gpus
    assert set(per_node.values()) == {8}  # tensor-parallel pairs fill nodes, never straddle them
    assert p.bundles("engine")[0] == {"CPU": 8, "GPU": 2.0}
    assert "24 engine(s) on 48 GPU(s), 16 learner rank(s) on 16 GPU(s)" in p.describe()


def test_local_cpu_layout():
    p = plan(ClusterSpec([NodeGroup("local", 1, cpus=4)]), Demand(engines=1, learner_ranks=2, driver_cpus=1))
    assert len(p.of("engine")) == 1 and len(p.of("learner")) == 2
    assert p.bundles("learner") == [{"CPU": 1}, {"CPU": 1}]


def test_too_many_engines_is_a_clear_error():
    with pytest.raises(PlacementError, match=r"cannot place engine 3 of 4 .* have 4 CPUs and 0 GPUs in all"):
        plan(ClusterSpec([NodeGroup("local", 1, cpus=4)]), Demand(engines=4, learner_ranks=2, cpus_per_engine=1))


def test_tensor_parallel_larger_than_a_node_is_refused():
    cluster = ClusterSpec([NodeGroup("gpu", 2, cpus=32, gpus=4)])
    with pytest.raises(PlacementError, match=r"each needs 1 CPU \+ 8 GPU on one node"):
        plan(cluster, Demand(engines=1, tensor_parallel=8, learner_ranks=1, gpus_per_rank=1))


def test_actors_are_pinned_to_node_groups_only_where_the_cluster_marks_them():
    from vespo.config.placement import role_options

    assert role_options({"CPU": 4.0}, "rollout") == {}
    assert role_options({"CPU": 96.0, "vespo_rollout": 6.0}, "rollout") == {"resources": {"vespo_rollout": 0.001}}
    assert role_options({"CPU": 96.0, "vespo_rollout": 6.0}, "learner") == {}


def test_a_cluster_file_is_checked_like_a_run_config(tmp_path):
    from configtypes import ConfigError
    from vespo.config.placement import cluster_from_file

    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  - {name: head, cpus: 8}\n  - {name: gpu, count: 2, cpus: 32, gpus: 4, role: rollout}\n")
    assert cluster_from_file(path) == ClusterSpec([NodeGroup("head", cpus=8), NodeGroup("gpu", 2, 32, 4, "rollout")])
    for text, message in [
        ("nodes:\n  - {name: a, gpus: -1}\n", r"cluster.yaml: nodes\[0\].gpus must be >= 0, got -1$"),
        ("nodes:\n  - {name: a, gpu: 1}\n", r"cluster.yaml: unknown key 'nodes\[0\].gpu'; did you mean 'gpus'\?"),
        ("nodes:\n  - {name: a, role: trainer}\n", r"nodes\[0\].role must be 'rollout', 'learner' or 'shared'"),
        ("nodes:\n  - {cpus: 4}\n", r"missing required key 'nodes\[0\].name'"),
        ("nodes: []\n", r"nodes must hold at least 1 item\(s\), got 0"),
        ("nodes:\n  - {name: a}\n  - {name: a}\n", r"node group names must differ, 'a' is used twice"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            cluster_from_file(path)
    path.write_text("workers: 3\n")
    with pytest.raises(PlacementError, match="expected a Ray cluster launcher config"):
        cluster_from_file(path)
