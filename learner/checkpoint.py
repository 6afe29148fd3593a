"""Checkpoints that resume a run exactly, sealed with a checksummed manifest, loaded without
unpickling code, and written so that no crash ever leaves `latest` without a complete checkpoint.

Layout of one checkpoint, root/step_00000042/:
    deepspeed/   DeepSpeed's own per-rank model, optimizer and scheduler state
    rng/         each rank's torch RNG state (safetensors)
    model/       the full weights as a Hugging Face directory (safetensors), for export
    buffer/      the replay buffer's snapshot, when the caller supplies one
    controller/  the controller's state.json, when the caller supplies one
    meta.json    step, policy version, layout and the manifest: every other file's size and
                 sha256. Written last: a directory without it was never sealed.
A step written again (a run resumed from an older step reaches it a second time) goes to
step_00000042.r1, .r2, ...: a name is never reused while its old contents exist, so the old
checkpoint stays whole until the new one is sealed and `latest` names it. Checkpoints are
ordered by (step, revision).

Writing (prepare_staging, the caller's writes, finalize):
    1. everything is written into root/step_XXXXXXXX.tmp (prepare_staging makes it fresh);
    2. finalize fsyncs every file and directory in it, then writes meta.json (the manifest)
       atomically as the last file: until then the directory is not a checkpoint;
    3. renames it to a final name that does not exist yet, fsyncs root;
    4. replaces root/latest atomically (temporary file, fsync, os.replace, fsync root);
    5. only then removes what it superseded (the same step's older revisions) and prunes to
       the newest `keep`; removal renames a directory to *.deleting first, so a crash halfway
       through an rmtree leaves garbage with an unmistakable name, never a half checkpoint
       under a checkpoint's name.
A crash at any point leaves `latest` naming a complete, verifiable checkpoint (the old one
before step 4, the new one from it on). One writer per root at a time.

Reading: `latest` follows the pointer only to a plain step_... name of a direct child of root
(never an absolute path, `..`, or a symlink); `validate` checks the manifest against the files
(nothing missing, nothing unlisted, sizes, then sha256), so a truncated shard or a tampered
file is refused before DeepSpeed sees it. DeepSpeed's files are torch pickles; they are read
with weights_only=True and an allowlist of the three DeepSpeed classes they hold.

Everything here but the DeepSpeed engine, export_hf and the RNG helpers is standard library:
`vespo eval`, `vespo train --resume` and the crash tests read checkpoints without importing
torch or DeepSpeed (see __getattr__).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "state"
LATEST = "latest"
META = "meta.json"
FORMAT = 2  # 2: meta.json holds the manifest of every file; 1 (older) had none
STAGING_SUFFIX = ".tmp"  # a write in progress, or one that crashed
TRASH_SUFFIX = ".deleting"  # a checkpoint being removed
_WRITING_SUFFIX = ".writing"  # _write_atomic's temporary file
# a checkpoint's final name: step_00000042 (revision 0) or step_00000042.r3
_NAME = re.compile(r"step_(\d{8})(?:\.r([1-9]\d*))?")
# what a crashed write or removal leaves behind, safe to delete once no write is in progress
_GARBAGE = re.compile(r"step_\d{8}(?:\.r[1-9]\d*)?(?:\.tmp|\.deleting)")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from; the message says why."""


def __getattr__(name: str):
    """WeightsOnlyCheckpointEngine and SAFE_GLOBALS import torch and DeepSpeed (seconds): they
    are built on first use, so reading and validating checkpoints stays standard library."""
    if name in ("WeightsOnlyCheckpointEngine", "SAFE_GLOBALS"):
        value = _deepspeed_names()[name]
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _deepspeed_names() -> dict:
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    safe_globals = [LossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine with the load made safe (weights_only)."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_globals):
                return torch.load(path, map_location=map_location, weights_only=True)

    WeightsOnlyCheckpointEngine.__qualname__ = "WeightsOnlyCheckpointEngine"  # pickles by reference
    return {"WeightsOnlyCheckpointEngine": WeightsOnlyCheckpointEngine, "SAFE_GLOBALS": safe_globals}


@dataclass
class CheckpointMeta:
    step: int
    policy_version: int
    world_size: int
    zero_stage: int
    format: int = FORMAT
    files: dict[str, dict] = field(default_factory=dict)  # relpath -> {"size": int, "sha256": str}; finalize fills it


# -- names ----------------------------------------------------------------------------------


def step_dir(root: str | Path, step: int, revision: int = 0) -> Path:
    return Path(root) / (f"step_{step:08d}" + (f".r{revision}" if revision else ""))


def staging_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}{STAGING_SUFFIX}"


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, revision) of a checkpoint's final name, None for anything else (.tmp included)."""
    m = _NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


# -- writing --------------------------------------------------------------------------------


def prepare_staging(root: str | Path, step: int) -> Path:
    """A fresh, empty staging directory for `step` (parents made). One left by an earlier
    write of that step is removed: it was never sealed, so it is incomplete by definition."""
    staged = staging_dir(root, step)
    if staged.is_symlink() or staged.is_file():
        staged.unlink()
    elif staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    return staged


def export_hf(state_dict: dict[str, torch.Tensor], source_model_dir: str | Path, out_dir: Path) -> None:
    """Write full weights as a Hugging Face model directory next to the source's config and tokenizer."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(source_model_dir).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(item, out_dir / item.name)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}  # clone: no shared storage
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def finalize(root: str | Path, meta: CheckpointMeta, keep: int = 0) -> Path:
    """Seal the staged checkpoint of meta.step and make it the one `latest` names; returns its
    final path. The order is what makes a crash harmless (see the module docstring): data
    durable, manifest last, rename to an unused name, pointer, and only then any removal.
    `keep` > 0 prunes to the newest `keep` complete checkpoints (never the one `latest` names);
    0 keeps all. Stale staging directories of crashed writes are removed either way."""
    root = Path(root)
    staged = staging_dir(root, meta.step)
    if not staged.is_dir() or staged.is_symlink():
        raise CheckpointError(f"nothing staged to finalize: {staged} is not a directory (see prepare_staging)")
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), not {keep}")
    # 1. every byte on disk, and the manifest built from the same open files
    files = {}
    for rel in sorted(_tree_files(staged, skip_top={META, META + _WRITING_SUFFIX})):
        with open(staged / rel, "rb") as f:
            os.fsync(f.fileno())
            files[rel] = {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    for d in _tree_dirs(staged):
        _fsync_dir(d)
    # 2. meta.json last: from here on the directory is a checkpoint
    sealed = dataclasses.replace(meta, format=FORMAT, files=files)
    _write_atomic(staged / META, json.dumps(asdict(sealed), indent=1, sort_keys=True))
    # 3. a name nothing holds: an older checkpoint of this step stays whole until step 5
    revisions = [r for s, r in _final_names(root).values() if s == meta.step]
    final = step_dir(root, meta.step, 1 + max(revisions, default=-1))
    os.rename(staged, final)
    _fsync_dir(root)
    # 4. the pointer
    _write_atomic(root / LATEST, final.name)
    # 5. what is superseded, then pruning
    revision = parse_name(final.name)[1]
    for name, (step, rev) in _final_names(root).items():
        if step == meta.step and rev < revision:
            _remove(root / name, "superseded by " + final.name)
    prune(root, keep)
    return final


def prune(root: str | Path, keep: int) -> list[Path]:
    """Remove stale *.tmp / *.deleting directories and, with keep > 0, every complete
    checkpoint but the newest `keep` by (step, revision) and the one `latest` names. A
    directory with a checkpoint's name that does not validate is left alone (for a person to
    look at). Call it only when no write into root is in progress. Returns what it removed."""
    root = Path(root)
    removed = []
    for entry in sorted(root.iterdir()):
        if _GARBAGE.fullmatch(entry.name):
            _remove(entry, "stale")
            removed.append(entry)
    if keep > 0:
        pointed = _pointer_name(root)
        for path in list_checkpoints(root)[:-keep]:
            if path.name != pointed:
                _remove(path, f"pruned (keeping the newest {keep})")
                removed.append(path)
    return removed


# -- reading --------------------------------------------------------------------------------


def latest(root: str | Path, verify: bool = True) -> Path:
    """The checkpoint `root/latest` names (or root itself if it is a checkpoint), validated;
    verify=False skips the checksums (sizes and structure are still checked)."""
    root = Path(root)
    if _is_step_dir(root):
        return validate(root, verify)
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        raise CheckpointError(f"no checkpoint under {root}: there is no '{LATEST}' file")
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a plain file; refusing to follow it")
    name = pointer.read_text().strip()
    return validate(_resolve_pointer(root, name), verify)


def validate(path: str | Path, verify: bool = True) -> Path:
    """`path` if it is a complete checkpoint, else CheckpointError naming the problem.

    Checked: a sealed name and a readable meta.json of the current format; the manifest
    against the files on disk (every listed file present, no unlisted file: an extra
    DeepSpeed shard would change what is loaded, so extras are refused too; no symlinks);
    every size; then, with verify, every sha256. A successful full verification is
    remembered for this process per (path, meta.json's inode, mtime and size), so a run
    that resolves `latest` twice hashes once; the sizes are checked every time."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.endswith(STAGING_SUFFIX):
        raise CheckpointError(f"{path} is a partial checkpoint (its write never finished)")
    if path.name.endswith(TRASH_SUFFIX):
        raise CheckpointError(f"{path} is a checkpoint being deleted (superseded or pruned)")
    try:
        meta = read_meta(path)
        meta_stat = (path / META).stat()
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {META} (partial or corrupt): {err}") from err
    if meta.format < FORMAT or not meta.files or not isinstance(meta.files, dict):
        raise CheckpointError(
            f"checkpoint {path} has no file manifest in its {META} (format {meta.format}, written before checkpoints "
            f"were checksummed): its files cannot be verified, so it is refused; write a new checkpoint"
        )
    bad = [rel for rel, entry in meta.files.items() if not _is_manifest_entry(entry)]
    if bad:
        raise CheckpointError(f"checkpoint {path} has a malformed manifest entry for {bad[0]!r} in its {META}")
    on_disk = _tree_files(path, skip_top={META})
    missing = sorted(set(meta.files) - on_disk)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks listed file {missing[0]!r}" + _more(missing))
    unlisted = sorted(on_disk - set(meta.files))
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds file {unlisted[0]!r}, not in its manifest" + _more(unlisted))
    for rel, entry in sorted(meta.files.items()):
        size = (path / rel).stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {path}: {rel} is {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
            )
    key = (str(path.resolve()), meta_stat.st_ino, meta_stat.st_mtime_ns, meta_stat.st_size)
    if verify and key not in _verified:
        for rel, entry in sorted(meta.files.items()):
            with open(path / rel, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != entry["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {rel} does not match its sha256 in the manifest (corrupt)")
        _verified.add(key)
    ds_dir = path / "deepspeed" / DEEPSPEED_TAG
    if not ds_dir.is_dir() or not any(ds_dir.iterdir()):
        raise CheckpointError(f"checkpoint {path} lacks its DeepSpeed state in {ds_dir}")
    ranks = [r for r in range(meta.world_size) if f"rng/rank_{r}.safetensors" not in meta.files]
    if ranks:
        raise CheckpointError(f"checkpoint {path} lacks the RNG state of rank(s) {ranks}")
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(path) / META).read_text()))


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints directly under root, oldest first by (step, revision).
    Complete means validate(verify=False) passes: sealed, manifest matching in names and sizes."""
    root = Path(root)
    found = []
    for name, order in _final_names(root).items():
        path = root / name
        if path.is_symlink():
            continue
        try:
            validate(path, verify=False)
        except CheckpointError:
            continue
        found.append((order, path))
    return [path for _, path in sorted(found)]


def checkpoint_root(path: str | Path) -> Path:
    """The checkpoints root a --resume path points into: the path itself when it holds
    `latest` or checkpoint directories, its parent when it is a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (expected a checkpoint or a checkpoints root)")
    if (path / LATEST).exists() or _final_names(path):
        return path
    if _is_step_dir(path):
        return path.parent
    raise CheckpointError(f"{path} is neither a checkpoints root (no '{LATEST}', no step_* directory) nor a checkpoint")


# -- RNG ------------------------------------------------------------------------------------


def save_rng(path: Path, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (path / "rng").mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "rng" / f"rank_{rank}.safetensors"))


def load_rng(path: Path, rank: int) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path / "rng" / f"rank_{rank}.safetensors"))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- helpers --------------------------------------------------------------------------------

_verified: set[tuple] = set()  # validate's memo of fully verified checkpoints (this process)


def _resolve_pointer(root: Path, name: str) -> Path:
    """root/name if `name` is a checkpoint's plain name and that entry is a real directory
    directly in root: a pointer is data, and must not lead a resume anywhere else."""
    pointer = root / LATEST
    if not name:
        raise CheckpointError(f"{pointer} is empty")
    if os.path.isabs(name):
        raise CheckpointError(f"{pointer} names an absolute path ({name!r}); it must name a step_* entry of {root}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer} names {name!r}, not a direct child of {root} ('..' or a subdirectory)")
    if name.endswith(STAGING_SUFFIX) and parse_name(name[: -len(STAGING_SUFFIX)]):
        raise CheckpointError(f"{root / name} is a partial checkpoint (its write never finished)")
    if parse_name(name) is None:
        raise CheckpointError(f"{pointer} names {name!r}, not a checkpoint name (step_XXXXXXXX or step_XXXXXXXX.rN)")
    path = root / name
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symlink (to {os.readlink(path)}); a checkpoint must be a real directory")
    if path.exists() and path.resolve().parent != root.resolve():
        raise CheckpointError(f"{path} leads outside {root} (to {path.resolve()})")
    return path


def _pointer_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except OSError:
        return None


def _is_step_dir(path: Path) -> bool:
    """A checkpoint directory rather than a root: by its name or by what it holds."""
    name = path.name.removesuffix(STAGING_SUFFIX).removesuffix(TRASH_SUFFIX)
    return path.is_dir() and (parse_name(name) is not None or (path / META).exists() or (path / "deepspeed").exists())


def _final_names(root: Path) -> dict[str, tuple[int, int]]:
    """Entries of root with a checkpoint's final name -> (step, revision), complete or not."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return {}
    return {n: order for n in names if (order := parse_name(n)) is not None}


def _tree_files(top: Path, skip_top: set[str]) -> set[str]:
    """Every file under top as a '/'-separated relative path (names in skip_top, at the top
    level, left out). A symlink anywhere is refused: it could lead out of the checkpoint."""
    files = set()
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        for name in dirnames + filenames:
            if (here / name).is_symlink():
                raise CheckpointError(f"checkpoint {top} holds a symlink, {(here / name).relative_to(top)}; refused")
        for name in filenames:
            rel = (here / name).relative_to(top).as_posix()
            if here != top or name not in skip_top:
                files.add(rel)
    return files


def _tree_dirs(top: Path) -> list[Path]:
    """top and every directory under it, deepest first."""
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]


def _is_manifest_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _remove(path: Path, why: str) -> None:
    """Rename to *.deleting (atomic, so no half-deleted directory keeps a checkpoint's name),
    then delete. Failing to delete is logged, not raised: the new checkpoint is sealed."""
    resolved = str(path.resolve())
    for key in [k for k in _verified if k[0] == resolved]:
        _verified.discard(key)
    try:
        if not path.name.endswith((STAGING_SUFFIX, TRASH_SUFFIX)):
            trash = path.with_name(path.name + TRASH_SUFFIX)
            if trash.exists() or trash.is_symlink():
                _remove(trash, "stale")
            os.rename(path, trash)
            _fsync_dir(path.parent)
            path = trash
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a symlink goes, never what it points at
        else:
            shutil.rmtree(path)
        log.info("checkpoint %s removed: %s", path, why)
    except OSError as err:
        log.warning("could not remove %s (%s): %s", path, why, err)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable. Some filesystems cannot
    fsync a directory (EINVAL); there the rename is as durable as they make it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader sees the old or the new content, never a mix,
    and the new content survives a crash once this returns."""
    tmp = path.with_name(path.name + _WRITING_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
