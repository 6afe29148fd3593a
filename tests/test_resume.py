"""Faults on the driver side: SIGTERM mid-run stops cleanly (checkpoint written, every process
of the run gone, a message saying how to resume), and `vespo train --resume` continues that
run exactly where it stopped: step, policy version, buffer, prompts in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
from wandb_offline import read_run

from learner.checkpoint import CheckpointError, latest
from vespo.train import config_of_checkpoint, run

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "train.groups_per_step=4", "rollout.n=4", "train.eval_every=0", "train.max_inflight_groups=8",
    "buffer.max_staleness=2",
]  # fmt: skip


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path):
    out = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "vespo", "train", "train.steps=5000", *OVERRIDES, f"train.output_dir={out}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 300
    for line in driver.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3:
            break
        assert time.monotonic() < deadline and driver.poll() is None, "".join(lines[-50:])
    family = psutil.Process(driver.pid).children(recursive=True)  # Ray, the engine, the learner, ...
    assert family, "the run started no processes?"
    driver.send_signal(signal.SIGTERM)
    rest, _ = driver.communicate(timeout=180)
    text = "".join(lines) + rest
    assert driver.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "SIGTERM: finishing the current step" in text and "stopped by SIGTERM" in text
    assert f"resume with: vespo train --resume {out}/checkpoints/step_" in text

    time.sleep(2)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphans after SIGTERM: {[(p.pid, p.name()) for p in alive]}"

    ckpt = latest(out / "checkpoints")
    state = json.loads((ckpt / "controller" / "state.json").read_text())
    stopped_at = state["step"]
    assert 3 <= stopped_at < 5000 and json.loads((ckpt / "meta.json").read_text())["step"] == stopped_at
    snapshot = msgpack.unpackb((ckpt / "buffer" / "buffer.msgpack").read_bytes(), strict_map_key=False)
    held = {g for g, _ in snapshot["ready"]} | set(snapshot["incomplete"])
    seen = {tid.rsplit("/", 1)[0] for tid in snapshot["seen"]}
    requeued = [gid for gid, _ in state["requeue"]]
    assert not set(requeued) & seen, "a requeued prompt was already in the buffer"

    # resume for two more steps, in this process, from the checkpoints root (its newest step)
    cfg = config_of_checkpoint(str(out / "checkpoints"), [f"train.steps={stopped_at + 2}"])
    summary = run(cfg, resume=str(out / "checkpoints"))
    assert summary.steps == stopped_at + 2 and summary.version == stopped_at + 2 and summary.stopped is None
    trained_before = seen - held  # received by the buffer and already taken (or dropped) before the stop
    assert not set(summary.trained_groups) & trained_before, "a group was trained twice across the resume"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    history, _ = read_run(runs[-1])
    assert [row["_step"] for row in history if "reward/mean" in row] == [stopped_at + 1, stopped_at + 2]
    assert all(row["staleness/batch_max"] <= cfg.buffer.max_staleness for row in history if "reward/mean" in row)


def test_partial_checkpoint_is_refused_with_the_reason(tmp_path):
    step = tmp_path / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    with pytest.raises(CheckpointError, match="partial or corrupt"):
        config_of_checkpoint(str(tmp_path / "checkpoints"), [])
    done = subprocess.run(
        [sys.executable, "-m", "vespo", "train", "--resume", str(tmp_path / "checkpoints")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "partial or corrupt" in done.stdout + done.stderr


def test_a_dead_learner_rank_stops_the_run_with_how_to_resume(tmp_path):
    import threading

    import ray

    from vespo import run_config
    from vespo.controller import Controller, LearnerFailed

    cfg = run_config.load(None, ["train.steps=500", "train.checkpoint_every=2", *OVERRIDES,
                                 f"train.output_dir={tmp_path}", "wandb.mode=disabled"])  # fmt: skip
    controller = Controller(cfg)
    try:
        controller.setup()

        def kill_rank_after_a_checkpoint():
            while not (tmp_path / "checkpoints" / "latest").exists():
                time.sleep(0.1)
            ray.kill(controller.learner.workers[0])  # fault injection: rank 0 dies mid-run

        threading.Thread(target=kill_rank_after_a_checkpoint, daemon=True).start()
        with pytest.raises(LearnerFailed) as failure:
            controller.run()
    finally:
        controller.shutdown()
        ray.shutdown()
    message = str(failure.value)
    assert "an actor of the run died at step" in message and "ActorDiedError" in message
    assert f"continue with: vespo train --resume {tmp_path}/checkpoints" in message
    assert latest(tmp_path / "checkpoints").name.startswith("step_")
