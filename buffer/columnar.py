"""Many trajectories as a few flat arrays, for moving them between processes.

Sent one by one through Ray, each record's four small arrays are pickled as separate
buffers; 256 records make a thousand tiny objects. Packed, the same records are four
concatenated arrays plus one list of scalar fields: a handful of large, zero-copy buffers.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from buffer.trajectory import _ARRAYS, Trajectory

_SCALARS = [f.name for f in fields(Trajectory) if f.name not in _ARRAYS]


def pack(trajectories: list[Trajectory]) -> dict[str, Any]:
    out: dict[str, Any] = {"scalars": [tuple(getattr(t, n) for n in _SCALARS) for t in trajectories]}
    for name, dtype in _ARRAYS.items():
        parts = [getattr(t, name) for t in trajectories]
        out[name] = np.concatenate(parts) if parts else np.zeros(0, dtype)
        out[name + "_len"] = np.fromiter((len(p) for p in parts), np.int64, len(parts))
    return out


def unpack(payload: dict[str, Any]) -> list[Trajectory]:
    columns = {}
    for name in _ARRAYS:
        bounds = np.cumsum(payload[name + "_len"])[:-1]
        columns[name] = np.split(payload[name], bounds) if len(payload[name + "_len"]) else []
    return [
        Trajectory(**dict(zip(_SCALARS, row, strict=True)), **{n: columns[n][i] for n in _ARRAYS})
        for i, row in enumerate(payload["scalars"])
    ]
