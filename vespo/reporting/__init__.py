"""What a run reports: wandb and console metrics, evaluation scores, sample responses."""
