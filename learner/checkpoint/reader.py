"""Reading checkpoints: their names, the `latest` pointer and the manifest that seals them.

`latest` follows the pointer only to a plain step_... name of a direct child of root (never an
absolute path, `..`, or a symlink): a pointer is data, and must not lead a resume anywhere
else. `validate` checks the manifest against the files (nothing missing, nothing unlisted,
sizes, then sha256), so a truncated shard or a tampered file is refused before DeepSpeed sees
it. Standard library only: `vespo eval`, `vespo train --resume` and the crash tests read
checkpoints without importing torch or DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEEPSPEED_TAG = "state"
MODEL_DIR = "model"  # full fine-tuning: the full weights as a Hugging Face directory
ADAPTER_DIR = "adapter"  # LoRA (learner.checkpoint.adapter): the adapter in PEFT's format, no base weights
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LATEST = "latest"
META = "meta.json"
FORMAT = 2  # 2: meta.json holds the manifest of every file; 1 (older) had none
STAGING_SUFFIX = ".tmp"  # a write in progress, or one that crashed
TRASH_SUFFIX = ".deleting"  # a checkpoint being removed
# a checkpoint's final name: step_00000042 (revision 0) or step_00000042.r3
_NAME = re.compile(r"step_(\d{8})(?:\.r([1-9]\d*))?")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from; the message says why."""


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


def final_names(root: Path) -> dict[str, tuple[int, int]]:
    """Entries of root with a checkpoint's final name -> (step, revision), complete or not."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return {}
    return {n: order for n in names if (order := parse_name(n)) is not None}


def pointer_name(root: Path) -> str | None:
    """What root/latest says, unchecked; None when it cannot be read."""
    try:
        return (root / LATEST).read_text().strip()
    except OSError:
        return None


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
    on_disk = tree_files(path, skip_top={META})
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
    if any(rel.startswith(ADAPTER_DIR + "/") for rel in meta.files):  # a LoRA checkpoint: its adapter whole
        lacking = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if f"{ADAPTER_DIR}/{f}" not in meta.files]
        if lacking:
            raise CheckpointError(f"checkpoint {path} holds a LoRA adapter without {ADAPTER_DIR}/{lacking[0]}")
    return path


def forget_verified(path: Path | None = None) -> None:
    """Drop validate's memo of full verifications for `path` (every path when None): a
    directory about to be removed, or a reader that must hash from scratch."""
    if path is None:
        _verified.clear()
        return
    resolved = str(path.resolve())
    for key in [k for k in _verified if k[0] == resolved]:
        _verified.discard(key)


def read_meta(path: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(path) / META).read_text()))


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints directly under root, oldest first by (step, revision).
    Complete means validate(verify=False) passes: sealed, manifest matching in names and sizes."""
    root = Path(root)
    found = []
    for name, order in final_names(root).items():
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
    if (path / LATEST).exists() or final_names(path):
        return path
    if _is_step_dir(path):
        return path.parent
    raise CheckpointError(f"{path} is neither a checkpoints root (no '{LATEST}', no step_* directory) nor a checkpoint")


def tree_files(top: Path, skip_top: set[str]) -> set[str]:
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


def _is_step_dir(path: Path) -> bool:
    """A checkpoint directory rather than a root: by its name or by what it holds."""
    name = path.name.removesuffix(STAGING_SUFFIX).removesuffix(TRASH_SUFFIX)
    return path.is_dir() and (parse_name(name) is not None or (path / META).exists() or (path / "deepspeed").exists())


def _is_manifest_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
