"""The learner: DeepSpeed ranks as Ray actors, the objectives, checkpoints (docs/learner.md)."""
