"""Benchmarks: scripts run as `python -m kforcing_jax.bench.<name>`; each writes JSON + PNG."""
