"""Parallelism: the sharding policy (mesh, logical axes) and multi-process start-up."""
