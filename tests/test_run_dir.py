"""One run per output directory: a used one is refused unless resumed or overwritten, and
--overwrite removes only what a run writes. The CLI path is in tests/test_resume.py."""

from __future__ import annotations

import json

import pytest

from vespo.commands.train import config_of_checkpoint
from vespo.orchestration import run_dir


def used(tmp_path):
    """A folder as a run leaves it (a sealed checkpoint, its pointer, a wandb run), plus a user's file."""
    out = tmp_path / "run"
    run_dir.claim(out)
    step = out / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text(step.name)
    (out / "wandb" / "offline-run-20260101_120000-abcd1234" / "logs").mkdir(parents=True)
    (out / "wandb" / "latest-run").symlink_to("offline-run-20260101_120000-abcd1234")
    (out / "wandb" / "debug.log").symlink_to("offline-run-20260101_120000-abcd1234/logs/debug.log")
    (out / "notes.txt").write_text("mine")
    return out


def test_a_fresh_directory_is_claimed_and_a_used_one_refused(tmp_path):
    out = used(tmp_path)
    marker = json.loads((out / run_dir.MARKER).read_text())
    assert {"started", "pid", "host"} <= set(marker)
    with pytest.raises(run_dir.RunDirError, match="already holds a run .*newest checkpoint step_00000004") as err:
        run_dir.check(out)
    assert f"vespo train --resume {out / 'checkpoints'}" in str(err.value) and "--overwrite" in str(err.value)


def test_a_directory_with_only_a_marker_is_a_run_in_progress(tmp_path):
    out = tmp_path / "run"
    run_dir.claim(out)  # a run that has started and not checkpointed yet
    with pytest.raises(run_dir.RunDirError, match="no checkpoint yet"):
        run_dir.claim(out)


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    out = used(tmp_path)
    run_dir.claim(out, overwrite=True)
    assert not (out / "checkpoints").exists() and not (out / "wandb").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / run_dir.MARKER).exists()


def test_overwrite_keeps_the_users_files_in_checkpoints_and_wandb(tmp_path):
    out = used(tmp_path)
    staged = out / "checkpoints" / "step_00000005.tmp"  # a write that crashed: the writer's own
    staged.mkdir()
    mine = [out / "checkpoints" / "README.txt", out / "wandb" / "settings", out / "checkpoints" / "best" / "w.bin"]
    unsealed = out / "checkpoints" / "step_00000002"  # a checkpoint's name, but no manifest: not known as ours
    for path in [*mine, unsealed / "model.bin"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    run_dir.claim(out, overwrite=True)
    assert all(path.read_text() == "mine" for path in [*mine, unsealed / "model.bin"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README.txt", "best", "step_00000002"]
    assert [p.name for p in (out / "wandb").iterdir()] == ["settings"]


def test_resuming_keeps_everything_and_records_the_resume(tmp_path):
    out = used(tmp_path)
    run_dir.claim(out, resuming=True)
    assert (out / "checkpoints" / "step_00000004").is_dir()
    assert len(json.loads((out / run_dir.MARKER).read_text())["resumes"]) == 1


def test_a_run_that_ends_before_its_first_checkpoint_gives_the_directory_back(tmp_path):
    out = tmp_path / "run"
    run_dir.claim(out)
    run_dir.release(out)
    run_dir.check(out)  # free again
    out = used(tmp_path / "other")
    run_dir.release(out)  # it has a checkpoint: still held
    with pytest.raises(run_dir.RunDirError):
        run_dir.check(out)


def test_a_stored_config_is_validated_like_a_users(tmp_path, monkeypatch):
    from learner import checkpoint

    step = tmp_path / "checkpoints" / "step_00000001"
    (step / "controller").mkdir(parents=True)
    (step / "controller" / "state.json").write_text(json.dumps({"config": {"learner": {"lrr": 1e-5}}}))
    monkeypatch.setattr(checkpoint, "latest", lambda path, verify=True: step)  # the files are checked elsewhere
    with pytest.raises(ValueError, match="unknown key 'learner.lrr'; did you mean 'lr'"):
        config_of_checkpoint(tmp_path / "checkpoints", [])
    (step / "controller" / "state.json").write_text(json.dumps({"config": {"task": {"reward_fn": "shutil:rmtree"}}}))
    with pytest.raises(ValueError, match="not trusted to choose code"):
        config_of_checkpoint(tmp_path / "checkpoints", [])
    cfg = config_of_checkpoint(tmp_path / "checkpoints", ["task.reward_fn=shutil:rmtree"])  # named: taken
    assert cfg.task.reward_fn == "shutil:rmtree"
