"""Staleness-tagged replay buffer between rollout and learner."""

from buffer.config import BufferConfig
from buffer.replay import Batch, BufferFull, ReplayBuffer
from buffer.trajectory import Trajectory

__all__ = ["Batch", "BufferConfig", "BufferFull", "ReplayBuffer", "Trajectory"]
