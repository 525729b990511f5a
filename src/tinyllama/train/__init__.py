"""Pretraining: config, optimizer, checkpoints, parallelism and the training loop."""
