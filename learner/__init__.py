"""Learner: DeepSpeed training, weight broadcast and checkpoints (see issue: learner)."""
