"""Faults on the driver side: SIGTERM mid-run, sent to the driver's whole process group as
`timeout`, `kill -- -PGID` and batch schedulers do, stops cleanly (checkpoint written, every
process of the run gone, a message saying how to resume), and `vespo train --resume` continues that
run exactly where it stopped: step, policy version, buffer, prompts in flight."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from vespo.commands.train import config_of_checkpoint, run

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "train.groups_per_step=4", "rollout.n=4", "train.eval_every=0", "train.max_inflight_groups=8",
    "buffer.max_staleness=2",
]  # fmt: skip


REFUSAL = "refused a connection to the learner's stores:"  # what the run logs for each foreign joiner
FOREIGN_JOINER = r"""
import datetime, sys, torch, torch.distributed as dist
from runtime.rendezvous import AuthStore
host, port, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
timeout = datetime.timedelta(seconds=10)
try:
    if how == "tcpstore":  # what anyone with torch would try: the stock store client, then join as rank 1
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    else:  # the run's own protocol, without the run's secret
        store = AuthStore(host, port, b"guessed secret", timeout)
    group = dist.ProcessGroupGloo(dist.PrefixStore("vespo-weights", store), 1, 2, timeout)
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()
    print("RECEIVED", int(buffer.count_nonzero()))
except Exception as err:
    print("REFUSED", type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
"""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real async run: foreign processes try to join its weight group while it trains; at
    step 3 its process group gets SIGTERM (the driver leads a group of its own, as under
    `timeout` or a shell's job control; Ray's processes must not be in it). Yields (output dir,
    its whole output, what the joiners printed)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "vespo", "train", "train.steps=5000", *OVERRIDES, f"train.output_dir={out}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"}, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    joiners: list[str] = []
    stores: dict[str, str] = {}
    deadline = time.monotonic() + 300
    for line in driver.stdout:  # type: ignore[union-attr]
        lines.append(line)
        for group, marker in (("weights", "weight group: rank 0 at "), ("learner", "learner group: rendezvous at ")):
            if marker in line:
                stores[group] = line.split(marker)[1].split()[0].rstrip(",;")
        if line.startswith("step ") and len(stores) == 2 and not joiners:
            started = [
                subprocess.Popen([sys.executable, "-c", FOREIGN_JOINER, *stores[group].rsplit(":", 1), how], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for group, how in (("weights", "tcpstore"), ("weights", "wrong-secret"), ("learner", "tcpstore"))
            ]  # fmt: skip
            joiners = [joiner.communicate(timeout=60)[0][-3000:] for joiner in started]
        # the refusals are logged by learner rank 0 and reach this output through Ray's log
        # forwarding, a moment later: signal only once they are here, or a fast run outruns them
        refusals = sum(REFUSAL in seen for seen in lines)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3 and joiners and refusals >= 3:
            break
        assert time.monotonic() < deadline and driver.poll() is None, "".join(lines[-50:])
    family = psutil.Process(driver.pid).children(recursive=True)  # Ray, the engine, the learner, ...
    assert family, "the run started no processes?"
    os.killpg(driver.pid, signal.SIGTERM)  # the whole group, not just the driver
    rest, _ = driver.communicate(timeout=180)
    time.sleep(2)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return out, driver.returncode, "".join(lines) + rest, joiners, alive


def test_sigterm_checkpoints_and_stops_every_process(stopped_run):
    out, returncode, text, _, alive = stopped_run
    assert returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "SIGTERM: finishing the current step" in text and "stopped by SIGTERM" in text
    assert f"resume with: vespo train --resume {out}/checkpoints/step_" in text
    assert not alive, f"orphans after SIGTERM: {[(p.pid, p.name()) for p in alive]}"
    assert latest(out / "checkpoints").name in text  # the checkpoint the resume line names, sealed


def test_a_foreign_process_cannot_join_the_weight_group_of_a_running_job(stopped_run):
    _, _, text, joiners, _ = stopped_run
    assert len(joiners) == 3, text[-3000:]
    for output in joiners:  # the weight group's store twice, DeepSpeed's (the learner group's) once
        assert "REFUSED" in output and "RECEIVED" not in output, output
    assert "RendezvousError" in joiners[1]
    said = [line for line in text.splitlines() if f"{REFUSAL} 127.0.0.1:" in line]
    assert len(said) >= 3, text[-3000:]  # the run says so, naming each address
    steps = [int(line.split()[1].split("/")[0]) for line in text.splitlines() if line.startswith("step ")]
    assert max(steps) >= 3  # and trained on


def test_overwrite_removes_what_the_run_wrote_and_keeps_the_users_files(stopped_run, tmp_path):
    """run_dir.OWNED names everything a real run writes into checkpoints/ and wandb/: --overwrite
    removes all of it, and a user's own files there stay."""
    from vespo.orchestration import run_dir

    copy = tmp_path / "copy"
    shutil.copytree(stopped_run[0], copy, symlinks=True)
    assert list((copy / "wandb").glob("offline-run-*")) and list((copy / "checkpoints").glob("step_*"))
    for folder in ("checkpoints", "wandb"):
        (copy / folder / "notes.txt").write_text("mine")
    run_dir.claim(copy, overwrite=True)
    for folder in ("checkpoints", "wandb"):
        assert os.listdir(copy / folder) == ["notes.txt"] and (copy / folder / "notes.txt").read_text() == "mine"


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file but wandb's own debug logs, which its service process may
    still append to after the run that owns them has stopped."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
            if p.is_file() and not (p.parent.name == "logs" and p.name.startswith("debug"))}  # fmt: skip


def test_a_new_run_into_a_used_output_dir_is_refused_in_seconds(stopped_run):
    out = stopped_run[0]
    before = _snapshot(out / "checkpoints")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vespo", "train", f"train.output_dir={out}", "train.steps=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and time.monotonic() - started < 30, done.stdout + done.stderr
    assert f"train.output_dir {out} already holds a run" in done.stderr and "--overwrite" in done.stderr
    assert _snapshot(out / "checkpoints") == before
    latest(out / "checkpoints")  # still complete and verified


def test_resume_from_a_copy_continues_exactly_and_writes_into_the_copy(stopped_run, tmp_path):
    original = stopped_run[0]
    before = _snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    ckpt = latest(copy / "checkpoints")
    state = json.loads((ckpt / "controller" / "state.json").read_text())
    stopped_at = state["step"]
    assert 3 <= stopped_at < 5000 and json.loads((ckpt / "meta.json").read_text())["step"] == stopped_at
    snapshot = msgpack.unpackb((ckpt / "buffer" / "buffer.msgpack").read_bytes(), strict_map_key=False)
    held = {g for g, _ in snapshot["ready"]} | set(snapshot["incomplete"])
    seen = {tid.rsplit("/", 1)[0] for tid in snapshot["seen"]}
    requeued = [gid for gid, _ in state["requeue"]]
    assert not set(requeued) & seen, "a requeued prompt was already in the buffer"

    # resume for two more steps, in this process, from the copy's checkpoints root (its newest step)
    found = latest(copy / "checkpoints")
    cfg = config_of_checkpoint(found, [f"train.steps={stopped_at + 2}"])
    cfg.train.output_dir = str(copy)  # what `vespo train --resume` sets: the copy, not the stored path
    summary = run(cfg, resume=found)
    assert summary.steps == stopped_at + 2 and summary.version == stopped_at + 2 and summary.stopped is None
    trained_before = seen - held  # received by the buffer and already taken (or dropped) before the stop
    assert not set(summary.trained_groups) & trained_before, "a group was trained twice across the resume"
    assert latest(copy / "checkpoints").name.startswith(f"step_{stopped_at + 2:08d}")
    runs = sorted((copy / "wandb").glob("offline-run-*"))
    history, _ = read_run(runs[-1])
    assert [row["_step"] for row in history if "reward/mean" in row] == [stopped_at + 1, stopped_at + 2]
    assert all(row["staleness/batch_max"] <= cfg.buffer.max_staleness for row in history if "reward/mean" in row)
    assert _snapshot(original) == before, "resuming a copy wrote into the original run"


PROBE = """
import os
open(os.environ["PROBE_MARK"], "w").write("imported")
def score(response, answer):
    return 0.0
"""


def _tamper(ckpt: Path, edit) -> None:
    """Rewrite controller/state.json and its manifest entry, as someone with write access could."""
    state_path = ckpt / "controller" / "state.json"
    state = json.loads(state_path.read_text())
    edit(state)
    state_path.write_text(json.dumps(state))
    meta = json.loads((ckpt / "meta.json").read_text())
    data = state_path.read_bytes()
    meta["files"]["controller/state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_resume_does_not_import_a_reward_fn_the_checkpoint_names(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run[0], copy)
    ckpt = latest(copy / "checkpoints")
    (tmp_path / "probe_reward.py").write_text(PROBE)
    mark = tmp_path / "imported"
    _tamper(ckpt, lambda state: state["config"]["task"].update(reward_fn="probe_reward:score"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "PROBE_MARK": str(mark)}
    done = subprocess.run([sys.executable, "-m", "vespo", "train", "--resume", str(copy / "checkpoints")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "task.reward_fn=probe_reward:score" in done.stderr and "not trusted to choose code" in done.stderr
    assert not mark.exists(), "the checkpoint's reward_fn was imported"
    # named by the user, it is taken (and only imported when the run builds its reward)
    cfg = config_of_checkpoint(ckpt, ["task.reward_fn=probe_reward:score"])
    assert cfg.task.reward_fn == "probe_reward:score" and not mark.exists()


def test_a_tampered_checkpoint_is_refused_before_anything_starts(stopped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run[0], copy)
    ckpt = latest(copy / "checkpoints")
    shard = max((p for p in (ckpt / "deepspeed").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # a truncated DeepSpeed shard
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vespo", "train", "--resume", str(copy / "checkpoints")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and time.monotonic() - started < 30, done.stdout + done.stderr
    assert shard.name in done.stderr, done.stderr
    assert "Started a local Ray" not in done.stdout + done.stderr  # refused before any actor


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

    from vespo.config import run_config
    from vespo.orchestration.controller import Controller, LearnerFailed

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


@pytest.mark.slow  # in CI: a stop while no batch can come, on fakes (test_orchestration.py, both modes)
def test_sigterm_stops_within_seconds_while_no_batch_can_arrive(tmp_path):
    """Every training prompt is too long for the engine, so no batch can ever arrive: the first
    SIGTERM must still stop the run within seconds; refused prompts must keep releasing their
    admission slots (feeding goes on past the buffer's admission limit instead of wedging)."""
    rows = [{"prompt": "+".join(["1"] * 60) + "=", "answer": "60"} for _ in range(9)] + [
        {"prompt": "1+2=", "answer": "3"}  # the held-out row: short, so the data passes the checks
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver = subprocess.Popen(
        [sys.executable, "-m", "vespo", "train", "train.steps=100", *OVERRIDES, "task.name=math",
         f"task.path={data}", "task.eval_fraction=0.1", "rollout.max_model_len=64", "rollout.max_new_tokens=8",
         f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 300
    for line in driver.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "prompt refused (100 so far" in line:  # 100 > the 12 admission slots (max_staleness 2 + 1) x 4
            break
        assert time.monotonic() < deadline and driver.poll() is None, "".join(lines[-50:])
    driver.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest, _ = driver.communicate(timeout=120)
    took = time.monotonic() - sent
    text = "".join(lines) + rest
    assert driver.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert took < 30, f"the stop took {took:.0f}s"
    assert "stopped by SIGTERM: 0 steps" in text, text[-3000:]
