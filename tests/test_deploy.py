"""Cluster launch: the placement dry run for the paper's layouts, and a real `ray job submit`
of the tiny config to a local Ray head started the way a cluster's head is."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from vespo.commands import plan as plan_command
from vespo.config import run_config
from vespo.config.placement import cluster_from_file, demand_of, plan

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize(
    ("config", "engines", "tp"), [("paper_sync_n8_7b.yaml", 48, 1), ("paper_async_30b.yaml", 12, 4)]
)
def test_dry_run_places_the_papers_layouts_on_48_rollout_and_16_train_gpus(config, engines, tp, capsys):
    cfg = run_config.load(DEPLOY / "configs" / config)
    p = plan(cluster_from_file(DEPLOY / "cluster.yaml"), demand_of(cfg, driver_cpus=1))
    assert len(p.of("engine")) == engines and all(s.gpus == tp for s in p.of("engine"))
    assert {s.group for s in p.of("engine")} == {"rollout_gpu"} and {s.group for s in p.of("learner")} == {"train_gpu"}
    per_node: dict[tuple[str, int], int] = {}
    for s in p.slots:
        per_node[(s.group, s.node)] = per_node.get((s.group, s.node), 0) + s.gpus
    assert per_node == {**{("rollout_gpu", n): 8 for n in range(6)}, **{("train_gpu", n): 8 for n in range(2)}}

    plan_command.main([str(DEPLOY / "configs" / config), "--cluster", str(DEPLOY / "cluster.yaml")])
    out = capsys.readouterr().out
    assert f"{engines} vLLM engine(s) x TP {tp} on 6 node(s), 48 GPU(s)" in out
    assert "world size 16 across 2 node(s), 16 GPU(s)" in out
    assert f"weight group: nccl, world size {engines * tp + 1}" in out
    assert "learner memory per rank" not in out  # only with --model


def test_dry_run_prints_what_an_moe_costs_the_layout(capsys):
    config, cluster = DEPLOY / "configs" / "paper_async_30b.yaml", DEPLOY / "cluster.yaml"
    plan_command.main([str(config), "--cluster", str(cluster), "--model", "qwen3-30b-a3b"])
    out = capsys.readouterr().out
    assert "model qwen3-30b-a3b: 30.53B parameters, 3.35B active a token (128 experts, 8 a token" in out
    assert "learner memory per rank (ZeRO-3 over 16 rank(s), bf16): weights 3.8 + fp32 master 7.6 + Adam 15.3" in out
    assert "weight sync: 61.1 GB a broadcast (2 bytes x 30.53B, every expert) to 48 receiver(s)" in out
    assert "training: 6 x 3.35B active = 20.1 GFLOPs a token" in out
    assert "8 of 128 a layer at 1 sequence (6.7 GB in all)" in out and "expert parallelism (not in this learner" in out


def test_dry_run_prints_what_lora_costs_the_layout(capsys):
    """learner.lora.rank=16 on the 30B layout: the adapter of the attention projections is what
    syncs (48 layers x 16 x (in + out) of q, k, v, o, 2 bytes each), the learner keeps the frozen
    weights and the adapter's state only, and needs far fewer ranks than full fine-tuning."""
    config, cluster = DEPLOY / "configs" / "paper_async_30b.yaml", DEPLOY / "cluster.yaml"
    plan_command.main([str(config), "learner.lora.rank=16", "--cluster", str(cluster), "--model", "qwen3-30b-a3b"])
    out = capsys.readouterr().out
    adapter = 48 * 16 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))
    assert f"= {adapter / 1e6:.2f}M adapter parameters" in out and "LoRA rank 16 (syncs send the adapter only)" in out
    assert f"weight sync: {2 * adapter / 1e6:.1f} MB an update, the adapter only" in out
    assert "full fine-tuning sends 61.1 GB" in out and "max_lora_rank 16" in out
    assert "gate_proj, up_proj, down_proj: no such module in qwen3-30b-a3b: its experts are fused" in out
    assert "(ZeRO-3 over 16 rank(s), bf16, LoRA): frozen weights 3.8 + adapter 0.002 + fp32 master 0.003" in out
    assert "= 5.8 GB" in out and "= 32.5 GB" not in out  # full fine-tuning's state is 32.5 GB a rank
    assert "at micro_batch_tokens 8192: LoRA 2, full fine-tuning 15" in out
    assert "expert parallelism" not in out  # experts frozen: no training state to place


def test_dry_run_says_what_does_not_fit(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config, cluster = DEPLOY / "configs" / "paper_async_30b.yaml", DEPLOY / "cluster.yaml"
        plan_command.main([str(config), "train.num_engines=13", "--cluster", str(cluster)])
    assert exit_info.value.code == 2
    assert "cannot place engine 13 of 13 (each needs 16 CPU + 4 GPU on one node)" in capsys.readouterr().out


def test_submit_checks_the_config_before_sending(capsys):
    from vespo.commands import submit

    with pytest.raises(SystemExit):
        submit.main(["deploy/configs/tiny.yaml", "train.stepz=3", "--address", "http://127.0.0.1:1"])
    assert "unknown key 'train.stepz'; did you mean 'steps'?" in capsys.readouterr().out


def _ray_starts(commands: list[str]) -> list[tuple[list[str], list[str]]]:
    """(environment assignments, flags) of every `ray start` among the launcher's commands."""
    starts = []
    for command in commands:
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if Path(words[i]).name == "ray" and words[i + 1] == "start":
                starts.append(([w for w in words[:i] if "=" in w], words[i + 2 :]))
    return starts


def _dropped_off_loopback(commands: list[str]) -> set[int]:
    """The TCP ports an `iptables ... ! -i lo -j DROP` rule among the commands closes."""
    ports: set[int] = set()
    for command in commands:
        for rule in command.split("||"):
            words = shlex.split(rule)
            if "iptables" in words and "DROP" in words and "lo" in words and "--dports" in words:
                ports |= {int(p) for p in words[words.index("--dports") + 1].split(",")}
    return ports


def test_cluster_yaml_starts_every_node_with_token_auth_and_loopback_dashboard():
    launcher = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    head, workers = launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]
    head_starts, worker_starts = _ray_starts(head), _ray_starts(workers)
    assert len(head_starts) == 1 and "--head" in head_starts[0][1]
    assert worker_starts and all(any(f.startswith("--address=") for f in flags) for _, flags in worker_starts)
    everything = [c for key, cmds in launcher.items() if key.endswith("_commands") for c in cmds or []]
    for env, flags in _ray_starts(everything):
        # a worker's `ray start` does not turn token auth on by itself: it must be asked to
        assert "RAY_AUTH_MODE=token" in env, flags
        hosts = [f.split("=", 1)[1] for f in flags if f.startswith("--dashboard-host")]
        assert hosts in ([], ["127.0.0.1"]), flags  # never 0.0.0.0 or a routable address
        if any(f.startswith("--ray-client-server-port") for f in flags):
            assert "RAY_AUTH_MODE=token" in env, flags  # the client server runs code for whoever connects
    assert "--dashboard-host=127.0.0.1" in head_starts[0][1]
    # every node gets the launching machine's token, owner-only
    assert launcher["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in launcher["setup_commands"])
    # the unauthenticated Prometheus endpoints answer loopback only, on the port actually used
    for commands, starts in ((head, head_starts), (workers, worker_starts)):
        closed = _dropped_off_loopback(commands)
        assert {44217, 44227} <= closed
        for _, flags in starts:
            metrics = [int(f.split("=", 1)[1]) for f in flags if f.startswith("--metrics-export-port=")]
            assert metrics and set(metrics) <= closed, flags


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A Ray head on loopback as `ray start --head` makes it, with its own temp dir (so test
    processes' `ray.init()` never attach to it) and its own ports; stopped by SIGTERM, which
    makes `ray start --block` take down everything it started."""
    temp = tempfile.mkdtemp(prefix="vrh", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, agent, agent_grpc, env_agent, metrics, nm, om, client = _free_ports(9)
    ray = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--ray-client-server-port={client}", "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError as err:
                if "401" in str(err) or "Unauthorized" in str(err):
                    break  # the server is up (and wants a token)
                assert time.monotonic() < deadline, "the Ray head's job server did not come up in 120s"
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)  # anything left of this head only
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_config_on_a_local_head(ray_head, tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    job_id = f"vespo-test-{os.getpid()}"
    out_dir = tmp_path / "run"
    submitted = subprocess.run(
        [sys.executable, "-m", "vespo", "submit", "deploy/configs/tiny.yaml", "train.steps=3",
         "train.groups_per_step=4", "train.eval_every=0", f"train.output_dir={out_dir}",
         "--address", ray_head, "--submission-id", job_id, "--python", sys.executable],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"job id: {job_id}" in submitted.stdout and "job logs" in submitted.stdout

    deadline, status = time.monotonic() + 480, ""
    while time.monotonic() < deadline:
        status = subprocess.run(
            [ray, "job", "status", "--address", ray_head, job_id], capture_output=True, text=True, env=_env()
        ).stdout
        if any(word in status.lower() for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = subprocess.run(
        [ray, "job", "logs", "--address", ray_head, job_id], capture_output=True, text=True, env=_env()
    )
    assert "succeeded" in status.lower(), status + logs.stdout[-4000:] + logs.stderr[-2000:]
    assert "done: 3 steps" in logs.stdout
    assert (out_dir / "checkpoints" / "step_00000003" / "meta.json").exists()


def _env() -> dict[str, str]:
    from vespo.commands.submit import client_env

    return client_env()
