"""Checkpoint safety without Ray or DeepSpeed: a writer killed at any point leaves `latest` on a
complete checkpoint, pruning keeps what it must, the pointer cannot lead out of the root, and
any damaged or unlisted file is refused by name. The checkpoints are fakes (checkpoint_fixtures)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_fixtures import FILES, ROOT, WORLD_SIZE, entries, tag_of, write, write_files

from learner import checkpoint
from learner.checkpoint import CheckpointError, CheckpointMeta, latest, list_checkpoints, validate

# -- a writer killed at every point ----------------------------------------------------------

CHILD = "import sys; sys.path.insert(0, 'tests'); from test_checkpoint_safety import _child; _child(*sys.argv[1:])"
# what finalize calls (unlink and rmdir: each step inside an rmtree, so a deletion dies halfway too)
KILLABLE = [(os, "fsync"), (os, "replace"), (os, "rename"), (shutil, "rmtree"), (os, "unlink"), (os, "rmdir")]
# scenario -> (step written, keep): the next step; step 1 again (a resumed run reaching it twice);
# the next step with keep=1, so step 1 is pruned (and a stale staging dir of a crash removed)
SCENARIOS = {"next": (2, 0), "rewrite": (1, 0), "prune": (2, 1)}


def _child(root: str, scenario: str, kill_at: str) -> None:
    """In a fresh interpreter: write the checkpoint of a SCENARIOS entry, dying with os._exit(9)
    right before the kill_at-th call of a KILLABLE function; "hang" writes half the data files,
    says so and waits for its SIGKILL."""
    root_path, kill_at_n = Path(root), int(kill_at)
    if scenario == "hang":
        staged = checkpoint.prepare_staging(root_path, 2)
        write_files(staged, 2, "new", stop_after=len(FILES) // 2)
        print("WRITING", flush=True)
        signal.pause()
    calls: list[str] = []

    def describe(arg, dir_fd=None) -> str:
        if isinstance(arg, int):  # an fsync'd descriptor: name its file
            arg = os.readlink(f"/proc/self/fd/{arg}")
        elif dir_fd is not None:  # rmtree's unlink(name, dir_fd=...)
            arg = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), arg)
        return os.path.relpath(arg, root_path) if isinstance(arg, str | os.PathLike) else repr(arg)

    def killing(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(f"{name}({', '.join(describe(a, kwargs.get('dir_fd')) for a in args)})")
            if len(calls) == kill_at_n:
                print(f"KILLED at {calls[-1]}", file=sys.stderr, flush=True)
                os._exit(9)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    for owner, name in KILLABLE:
        killing(owner, name)
    step, keep = SCENARIOS[scenario]
    write(root_path, step, "new", keep=keep)
    print(json.dumps(calls), flush=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_writer_killed_at_any_point_leaves_latest_on_a_complete_checkpoint(tmp_path, scenario):
    """Kill the writer before each filesystem call in turn (k = 1, 2, ... until it completes):
    `latest` always resolves and verifies, to the old step 1 until the pointer is replaced and
    to the new checkpoint from then on; a later write recovers and leaves no debris."""
    step, keep = SCENARIOS[scenario]
    new_name = "step_00000001.r1" if scenario == "rewrite" else "step_00000002"
    kills, switched = [], None
    for k in range(1, 200):
        root = tmp_path / f"kill_{k}"
        write(root, 1, "old")
        if scenario == "prune":
            write_files(checkpoint.prepare_staging(root, 5), 5, "crashed")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), scenario, str(k)], cwd=ROOT, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode in (0, 9), done.stderr
        checkpoint.forget_verified()  # verify from scratch, as a resumed process would
        found = latest(root)  # resolves, and every file checks out
        assert found.name in ("step_00000001", new_name)
        if found.name == "step_00000001":
            assert switched is None, f"latest went back to the old checkpoint at kill {k}"
            assert tag_of(found) == "old"
        else:
            switched = k if switched is None else switched
            assert tag_of(found) == "new"
        if done.returncode == 0:
            break
        kills.append((k, done.stderr.strip().removeprefix("KILLED at "), found.name))
        # recovery: the next write of the same step succeeds and tidies up after the crash
        again = write(root, step, "again", keep=keep)
        assert latest(root) == again and tag_of(again) == "again"
        expected = {"step_00000001", again.name} if scenario == "next" else {again.name}
        assert entries(root) - {checkpoint.LATEST} == expected
        assert [p.name for p in list_checkpoints(root)] == sorted(expected)
    else:
        pytest.fail("the writer never completed")
    calls = json.loads(done.stdout)
    assert len(kills) == len(calls) >= 20, calls
    # the phases were all reached: data fsync'd, meta.json replaced, the rename, the pointer
    # replaced, and (rewrite) the old step 1 moved aside and deleted after the switch
    ops = [op for _, op, _ in kills]
    assert any(op.startswith("fsync(step_00000001.tmp/deepspeed/state/") for op in ops) or any(
        op.startswith("fsync(step_00000002.tmp/deepspeed/state/") for op in ops
    )
    assert any(op.startswith("replace(") and "meta.json" in op for op in ops)
    assert any(op.startswith("rename(") and op.endswith(f", {new_name})") for op in ops)
    pointer_at = next(k for k, op, _ in kills if op == "replace(latest.writing, latest)")
    assert switched == pointer_at + 1  # the new checkpoint is live exactly once the pointer is replaced
    if scenario != "next":  # superseded or pruned: moved aside, then deleted file by file, after the switch
        assert "rename(step_00000001, step_00000001.deleting)" in ops[pointer_at:]
        assert "rmtree(step_00000001.deleting)" in ops[pointer_at:]
        assert any(op.startswith("unlink(") for op in ops[pointer_at:])
    if scenario == "prune":
        assert "rmtree(step_00000005.tmp)" in ops[pointer_at:]
    report = [f"  {k}: {op} -> latest {name}" for k, op, name in kills]
    print(f"{scenario}: {len(kills)} kill points:", *report, sep="\n")


def test_sigkill_while_data_files_are_written_leaves_latest_on_the_old_checkpoint(tmp_path):
    write(tmp_path, 1, "old")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), "hang", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "WRITING"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "step_00000002.tmp" / "deepspeed").is_dir()  # the half-written staging dir is there
    assert latest(tmp_path).name == "step_00000001" and tag_of(latest(tmp_path)) == "old"
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        validate(tmp_path / "step_00000002.tmp")
    assert write(tmp_path, 2, "new") == latest(tmp_path) == tmp_path / "step_00000002"
    assert entries(tmp_path) == {"step_00000001", "step_00000002", "latest"}


# -- naming, revisions, pruning ----------------------------------------------------------------


def test_a_step_written_again_gets_a_new_revision_and_replaces_the_old_only_after(tmp_path):
    first = write(tmp_path, 3, "a")
    second = write(tmp_path, 3, "b")
    assert (first.name, second.name) == ("step_00000003", "step_00000003.r1")
    assert not first.exists() and latest(tmp_path) == second and tag_of(second) == "b"
    third = write(tmp_path, 3, "c")
    assert third.name == "step_00000003.r2" and entries(tmp_path) == {"step_00000003.r2", "latest"}
    for name in ("step_00000003.r10", "step_00000002"):  # ordering is by (step, revision), numerically
        shutil.copytree(third, tmp_path / name)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003.r2", "step_00000003.r10"]
    assert checkpoint.parse_name("step_00000003.r10") == (3, 10) and checkpoint.parse_name("step_00000003.tmp") is None


def test_keep_prunes_to_the_newest_and_never_the_one_latest_names(tmp_path):
    for step in range(1, 6):
        write(tmp_path, step, "x", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert entries(tmp_path) == {"step_00000004", "step_00000005", "latest"}

    other = tmp_path / "other"
    for step in range(1, 4):
        write(other, step, "x", keep=0)  # keep=0 keeps all
    assert len(list_checkpoints(other)) == 3
    (other / "latest").write_text("step_00000001")  # e.g. pointed back by hand to resume from it
    assert checkpoint.prune(other, keep=1) == [other / "step_00000002"]
    assert [p.name for p in list_checkpoints(other)] == ["step_00000001", "step_00000003"]


def test_stale_staging_dirs_are_cleaned_and_a_damaged_checkpoint_is_left_for_a_person(tmp_path):
    write(tmp_path, 1, "x")
    write_files(checkpoint.prepare_staging(tmp_path, 9), 9, "crashed")  # a crashed write of a later step
    (tmp_path / "step_00000001.r1.deleting").mkdir()  # a crashed removal
    (tmp_path / "step_00000001.r1.deleting" / "leftover").write_text("x")
    (tmp_path / "step_00000007").mkdir()  # a checkpoint's name without meta.json: not ours to judge
    write(tmp_path, 2, "x", keep=1)
    assert entries(tmp_path) == {"step_00000002", "step_00000007", "latest"}
    with pytest.raises(CheckpointError, match="partial or corrupt"):
        validate(tmp_path / "step_00000007")


def test_prepare_staging_starts_a_step_afresh(tmp_path):
    staged = checkpoint.prepare_staging(tmp_path / "deep" / "root", 4)
    (staged / "junk").write_text("from a crashed write")
    assert checkpoint.prepare_staging(tmp_path / "deep" / "root", 4) == staged and list(staged.iterdir()) == []
    with pytest.raises(CheckpointError, match="nothing staged"):
        checkpoint.finalize(tmp_path, CheckpointMeta(5, 5, WORLD_SIZE, 2))


# -- the pointer -------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path):
    """A checkpoints root with step 1 and, beside it, another root with a complete checkpoint."""
    root, other = tmp_path / "run" / "checkpoints", tmp_path / "other"
    write(root, 1, "mine")
    write(other, 1, "elsewhere")
    return root, other


@pytest.mark.parametrize(
    ("pointer", "problem"),
    [
        ("/etc", "names an absolute path"),
        ("../../other/step_00000001", "not a direct child"),
        ("step_00000001/../../../other/step_00000001", "not a direct child"),
        ("OTHER_ABSOLUTE", "names an absolute path"),
        ("step_00000001.tmp", "partial checkpoint"),
        ("model", "not a checkpoint name"),
        ("", "is empty"),
    ],
)
def test_latest_refuses_a_pointer_that_leads_anywhere_but_a_child_checkpoint(roots, pointer, problem):
    root, other = roots
    pointer = str(other / "step_00000001") if pointer == "OTHER_ABSOLUTE" else pointer
    (root / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match=problem):
        latest(root)


def test_latest_refuses_a_symlinked_checkpoint_or_pointer(roots):
    root, other = roots
    (root / "step_00000007").symlink_to(other / "step_00000001")
    (root / "latest").write_text("step_00000007")
    with pytest.raises(CheckpointError, match="is a symlink"):
        latest(root)
    (root / "latest").unlink()
    (root / "latest").symlink_to(other / "latest")
    with pytest.raises(CheckpointError, match="not a plain file"):
        latest(root)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001"]  # the symlinked one is no checkpoint
    (root / "latest").unlink()
    assert write(root, 7, "x").name == "step_00000007.r1"  # the symlink is superseded: it goes, its target stays
    assert not (root / "step_00000007").is_symlink() and validate(other / "step_00000001")


def test_latest_of_a_step_dir_and_the_root_it_lies_in(roots):
    root, _ = roots
    step = root / "step_00000001"
    assert latest(root) == latest(step) == step
    assert checkpoint.checkpoint_root(root) == checkpoint.checkpoint_root(step) == root
    with pytest.raises(CheckpointError, match="neither a checkpoints root"):
        checkpoint.checkpoint_root(root.parent)


# -- the manifest ------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncate": (_truncate, "bytes, the manifest says"),
    "flip": (_flip, "does not match its sha256"),
    "delete": (Path.unlink, "lacks listed file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("rel", FILES)
def test_a_damaged_file_is_refused_by_name(tmp_path, rel, damage):
    found = write(tmp_path, 1, "x")
    how, problem = DAMAGE[damage]
    how(found / rel)
    with pytest.raises(CheckpointError, match=problem) as refused:
        latest(tmp_path)
    assert rel in str(refused.value)
    if damage != "flip":  # sizes and names are checked without verify too; a same-size flip needs the hash
        with pytest.raises(CheckpointError, match=problem):
            validate(found, verify=False)


def test_an_unlisted_file_a_symlink_and_a_manifest_leading_outside_are_refused(tmp_path):
    found = write(tmp_path, 1, "x")
    extra = found / "deepspeed" / "state" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"  # DeepSpeed would load it
    extra.write_bytes(b"planted")
    with pytest.raises(CheckpointError, match=r"deepspeed/state/zero_pp_rank_2_mp_rank_00_optim_states.pt'?, not in"):
        validate(found)
    extra.unlink()
    (found / "model" / "tokenizer.json").symlink_to("/etc/hostname")
    with pytest.raises(CheckpointError, match=r"symlink, model/tokenizer.json"):
        validate(found)
    (found / "model" / "tokenizer.json").unlink()
    meta = json.loads((found / "meta.json").read_text())
    meta["files"]["../outside"] = {"size": 1, "sha256": "0" * 64}
    (found / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "outside").write_text("x")
    with pytest.raises(CheckpointError, match=r"lacks listed file '\.\./outside'"):
        validate(found)


def test_a_checkpoint_without_a_manifest_is_refused_clearly(tmp_path):
    found = write(tmp_path, 1, "x")
    meta = json.loads((found / "meta.json").read_text())
    del meta["files"]
    meta["format"] = 1  # what the older format wrote
    (found / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no file manifest .*format 1"):
        latest(tmp_path)
    assert checkpoint.read_meta(found).files == {}  # read_meta itself reads both formats


def test_the_manifest_lists_every_file_and_read_meta_reads_it(tmp_path):
    found = write(tmp_path, 1, "x")
    meta = checkpoint.read_meta(found)
    assert meta.format == 2 and sorted(meta.files) == sorted(FILES)
    assert all(e["size"] == (found / rel).stat().st_size and len(e["sha256"]) == 64 for rel, e in meta.files.items())
    assert (meta.step, meta.policy_version, meta.world_size, meta.zero_stage) == (1, 1, WORLD_SIZE, 2)


def test_a_full_verification_is_remembered_but_sizes_are_checked_every_time(tmp_path, monkeypatch):
    found = write(tmp_path, 1, "x")
    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, d: hashed.append(f.name) or real(f, d))
    assert latest(tmp_path) == latest(tmp_path) == found
    assert len(hashed) == len(FILES)  # once, not twice
    os.utime(found / "meta.json", ns=(1, 1))  # meta.json changed: verify again
    latest(tmp_path)
    assert len(hashed) == 2 * len(FILES)
    _truncate(found / "buffer" / "buffer.msgpack")
    with pytest.raises(CheckpointError, match="buffer/buffer.msgpack is"):
        latest(tmp_path)


def test_reading_checkpoints_does_not_import_torch_or_deepspeed():
    code = "import sys, learner.checkpoint; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# -- vespo eval --checkpoint ---------------------------------------------------------------------


def test_eval_checkpoint_ignores_a_newer_partial_write(tmp_path, capsys):
    from vespo.commands.evaluate import checkpoint_model, main

    write(tmp_path, 1, "x")
    write_files(checkpoint.prepare_staging(tmp_path, 2), 2, "half")  # newer, never sealed, with a model/
    assert checkpoint_model(tmp_path) == str(tmp_path / "step_00000001" / "model")
    assert checkpoint_model(tmp_path / "step_00000001") == str(tmp_path / "step_00000001" / "model")
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        checkpoint_model(tmp_path / "step_00000002.tmp")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        checkpoint_model(empty)
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(tmp_path / "step_00000002.tmp")])
    assert exited.value.code == 2 and "partial checkpoint" in capsys.readouterr().err
