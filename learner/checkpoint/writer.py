"""Writing checkpoints so that no crash ever leaves `latest` without a complete checkpoint.

prepare_staging, the caller's writes, then finalize:
    1. everything is written into root/step_XXXXXXXX.tmp (prepare_staging makes it fresh);
    2. finalize fsyncs every file and directory in it, then writes meta.json (the manifest)
       atomically as the last file: until then the directory is not a checkpoint;
    3. renames it to a final name that does not exist yet, fsyncs root;
    4. replaces root/latest atomically (write_atomic);
    5. only then removes what it superseded (the same step's older revisions) and prunes to
       the newest `keep`; removal renames a directory to *.deleting first, so a crash halfway
       through an rmtree leaves garbage with an unmistakable name, never a half checkpoint
       under a checkpoint's name.
A crash at any point leaves `latest` naming a complete, verifiable checkpoint (the old one
before step 4, the new one from it on). One writer per root at a time. Standard library only.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from learner.checkpoint.reader import (
    FORMAT,
    LATEST,
    META,
    STAGING_SUFFIX,
    TRASH_SUFFIX,
    CheckpointError,
    CheckpointMeta,
    final_names,
    forget_verified,
    list_checkpoints,
    parse_name,
    pointer_name,
    staging_dir,
    step_dir,
    tree_files,
)

log = logging.getLogger(__name__)

_WRITING_SUFFIX = ".writing"  # write_atomic's temporary file
# what a crashed write or removal leaves behind, safe to delete once no write is in progress
_GARBAGE = re.compile(r"step_\d{8}(?:\.r[1-9]\d*)?(?:\.tmp|\.deleting)")


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
    for rel in sorted(tree_files(staged, skip_top={META, META + _WRITING_SUFFIX})):
        with open(staged / rel, "rb") as f:
            os.fsync(f.fileno())
            files[rel] = {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    for d in _tree_dirs(staged):
        fsync_dir(d)
    # 2. meta.json last: from here on the directory is a checkpoint
    sealed = dataclasses.replace(meta, format=FORMAT, files=files)
    write_atomic(staged / META, json.dumps(asdict(sealed), indent=1, sort_keys=True))
    # 3. a name nothing holds: an older checkpoint of this step stays whole until step 5
    revisions = [r for s, r in final_names(root).values() if s == meta.step]
    final = step_dir(root, meta.step, 1 + max(revisions, default=-1))
    os.rename(staged, final)
    fsync_dir(root)
    # 4. the pointer
    write_atomic(root / LATEST, final.name)
    # 5. what is superseded, then pruning
    revision = parse_name(final.name)[1]
    for name, (step, rev) in final_names(root).items():
        if step == meta.step and rev < revision:
            _remove(root / name, "superseded by " + final.name)
    prune(root, keep)
    return final


def written_here(entry: Path) -> bool:
    """Whether an entry of a checkpoints root is this writer's: a sealed checkpoint (a final name
    holding its manifest), the pointer or its staging file, or what a crashed write or removal
    left. Anything else there was put by someone else (`--overwrite` leaves it)."""
    name = entry.name
    if name in (LATEST, LATEST + _WRITING_SUFFIX) or _GARBAGE.fullmatch(name):
        return True
    return parse_name(name) is not None and (entry / META).is_file()


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
        pointed = pointer_name(root)
        for path in list_checkpoints(root)[:-keep]:
            if path.name != pointed:
                _remove(path, f"pruned (keeping the newest {keep})")
                removed.append(path)
    return removed


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write data to path so that a reader sees the old or the new content, never a mix,
    and the new content survives a crash once this returns."""
    tmp = path.with_name(path.name + _WRITING_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
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


def _tree_dirs(top: Path) -> list[Path]:
    """top and every directory under it, deepest first: a file's entry is durable before its parent's."""
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]


def _remove(path: Path, why: str) -> None:
    """Rename to *.deleting (atomic, so no half-deleted directory keeps a checkpoint's name),
    then delete. Failing to delete is logged, not raised: the new checkpoint is sealed."""
    forget_verified(path)
    try:
        if not path.name.endswith((STAGING_SUFFIX, TRASH_SUFFIX)):
            trash = path.with_name(path.name + TRASH_SUFFIX)
            if trash.exists() or trash.is_symlink():
                _remove(trash, "stale")
            os.rename(path, trash)
            fsync_dir(path.parent)
            path = trash
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a symlink goes, never what it points at
        else:
            shutil.rmtree(path)
        log.info("checkpoint %s removed: %s", path, why)
    except OSError as err:
        log.warning("could not remove %s (%s): %s", path, why, err)
