"""Structured configs: the base config and validation (every field checked before compiling)."""
