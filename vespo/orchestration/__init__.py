"""The training loop and what it drives: engines, batches, weight publishing, run state."""
