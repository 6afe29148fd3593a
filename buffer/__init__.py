"""Staleness-tagged replay buffer between rollout and learner."""
