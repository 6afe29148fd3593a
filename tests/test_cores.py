"""Each engine and learner rank on cores of its own: the choice, the config's checks, and a
process taking its cores (every thread, children and OpenMP included). The real run's cores
are checked in tests/test_train_e2e.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configtypes import ConfigError
from vespo.config import placement, run_config
from vespo.orchestration import ray_components
from vespo.orchestration.ray_components import CoreChoice

ROOT = Path(__file__).resolve().parents[1]
TWO_CORES = len(os.sched_getaffinity(0)) >= 2


def test_engines_and_ranks_get_disjoint_cores_as_many_as_ray_counts():
    engines, ranks = placement.assign_cores(list(range(8)), 2, 2, 3, 1)
    assert engines == [[0, 1], [2, 3]] and ranks == [[7], [6], [5]]
    everyone = [c for cores in engines + ranks for c in cores]
    assert len(everyone) == len(set(everyone))


@pytest.mark.parametrize("args, why", [
    ((list(range(2)), 2, 1, 1, 1), "need 3, this machine has 2"),
    ((list(range(4)), 1, 0.5, 1, 1), "not whole cores"),
])  # fmt: skip
def test_a_layout_that_cannot_be_pinned_says_why(args, why):
    assert why in placement.assign_cores(*args)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.cpu_cores=[[0], [1]]"], "rollout.cpu_cores has 2 core list(s) but train.num_engines is 1"),
    (["rollout.cpu_cores=[[0, 1]]"], "rollout.cpu_cores[0] names 2 core(s) but rollout.num_cpus is 1"),
    (["rollout.cpu_cores=[[1]]", "learner.cpu_cores=[[1]]"], "learner.cpu_cores[0] and rollout.cpu_cores[0] both"),
    (["learner.cpu_cores=[[]]"], "learner.cpu_cores"),
    (["learner.cpu_cores=[[-1]]"], "learner.cpu_cores"),
    (["train.pin_cores=sometimes"], "train.pin_cores"),
])  # fmt: skip
def test_named_cores_are_checked_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config.load(None, overrides)


def _one_node(monkeypatch, gpus: int = 0, nodes: int = 1):
    alive = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0, "GPU": gpus}}] * nodes
    monkeypatch.setattr(ray_components.ray, "nodes", lambda: alive)
    monkeypatch.setattr(ray_components, "node_ip", lambda: "10.0.0.1")


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_auto_pins_on_one_cpu_machine_and_off_does_not(monkeypatch):
    _one_node(monkeypatch)
    cores = sorted(os.sched_getaffinity(0))
    auto = ray_components.choose_cores(run_config.load(None, []))
    assert auto == CoreChoice([[cores[0]]], [[cores[-1]]], cores[:-1])  # driver and buffer off the learner's
    assert ray_components.choose_cores(run_config.load(None, ["train.pin_cores=false"])) == CoreChoice()
    named = run_config.load(None, ["rollout.cpu_cores=[[1]]", "learner.cpu_cores=[[0]]"])
    assert ray_components.choose_cores(named) == CoreChoice([[1]], [[0]])


def test_no_auto_pinning_on_gpu_nodes_or_clusters(monkeypatch):
    _one_node(monkeypatch, gpus=8)
    assert ray_components.choose_cores(run_config.load(None, [])) == CoreChoice()
    _one_node(monkeypatch, nodes=2)
    assert ray_components.choose_cores(run_config.load(None, [])) == CoreChoice()


PROBE = """
import os, sys, threading, subprocess, torch
from runtime.cores import pin_process
seen = {}
ready, go = threading.Event(), threading.Event()
def early():  # a thread that exists before the process takes its cores
    ready.set(); go.wait(); seen["thread"] = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=early); t.start(); ready.wait()
held = pin_process([int(sys.argv[1])])
go.set(); t.join()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True).stdout.strip()
print(held, seen["thread"], child, os.environ["OMP_NUM_THREADS"], torch.get_num_threads())
try:
    pin_process([4096])
except ValueError as err:
    print("refused:", err)
"""


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_a_pinned_process_holds_its_cores_on_every_thread_and_child():
    core = sorted(os.sched_getaffinity(0))[-1]
    out = subprocess.run([sys.executable, "-c", PROBE, str(core)], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()  # fmt: skip
    assert out[0] == f"[{core}] [{core}] [{core}] 1 1"
    assert out[1].startswith("refused: cores [4096] are not available")
