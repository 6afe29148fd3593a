"""Read what a wandb offline run recorded: history rows and config, from its .wandb file.

wandb 0.31 no longer ships a Python reader. The file is a LevelDB-style log: a 7-byte header
(":W&B", magic, version), then 32 KiB blocks of records, each a 7-byte header (crc32, length,
kind) and a slice of a protobuf `Record`; FIRST/MIDDLE/LAST kinds split a record over blocks.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: Path, wait_s: float = 30.0) -> tuple[list[dict], dict]:
    """(history rows as {key: value}, config as {key: value}) of an offline run directory.

    wandb's writer is another process: `finish()` can return before the file holds everything
    on a loaded machine. The run's `exit` record is written last, so wait (up to wait_s) for it."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + wait_s
    found = list(records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in found) and time.monotonic() < deadline:
        time.sleep(0.5)
        found = list(records(path))
    history, config = [], {}
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    return history, config
