"""Training loop, early stopping and checkpoints."""
