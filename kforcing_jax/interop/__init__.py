"""Checkpoints in and out: finished-stage loading and the authors' PyTorch format."""
