"""Staleness rules, as pure functions: how old a sample is, and whether new work may start.

Staleness of a trajectory = learner version now - the oldest policy version among its tokens
(partial rollouts mix versions; the oldest token bounds how off-policy the sample is). A
group is as stale as its stalest member, because GRPO advantages compare the members.

Admission (the rule AReaL uses): rollouts for a new group may start only while
    started groups (not dropped) < (current_version + max_staleness + 1) * groups_per_step
The learner consumes groups_per_step groups per version, so a group started now is trained
on within max_staleness versions: generation never runs further ahead than the cap allows,
and stale work is avoided instead of generated and thrown away.
"""

from __future__ import annotations

from collections.abc import Sequence

from buffer.trajectory import Trajectory


def group_staleness(group: Sequence[Trajectory], current_version: int) -> int:
    return max(t.staleness(current_version) for t in group)


def may_start(started_groups: int, current_version: int, max_staleness: int, groups_per_step: int) -> bool:
    return started_groups < (current_version + max_staleness + 1) * groups_per_step


def downweight(excess: int, decay: float) -> float:
    """Weight of a sample `excess` versions beyond the cap under the down-weight policy."""
    return decay ** max(excess, 0)
