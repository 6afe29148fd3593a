"""Trajectories and whole groups for buffer tests: a version per token, nothing else of a real rollout."""

from __future__ import annotations

import numpy as np

from buffer import Trajectory


def traj(gid: str, i: int, size: int, versions, reward: float = 0.0) -> Trajectory:
    versions = np.asarray(versions)
    return Trajectory(
        traj_id=f"{gid}/{i}",
        group_id=gid,
        group_size=size,
        prompt_ids=[1, 2],
        response_ids=np.arange(len(versions)) + 3,
        behavior_logprobs=-np.ones(len(versions)),
        token_versions=versions,
        version_start=int(versions.min()) if len(versions) else 0,
        version_end=int(versions.max()) if len(versions) else 0,
        reward=reward,
    )


def group(gid: str, size: int, version: int, length: int = 3) -> list[Trajectory]:
    return [traj(gid, i, size, [version] * length) for i in range(size)]
