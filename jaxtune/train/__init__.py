"""Training: optimizer, step, checkpoints, curves and the loop."""
