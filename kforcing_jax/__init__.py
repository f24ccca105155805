"""kforcing_jax: K-Forcing (push-forward, k-tokens-per-pass LMs) in JAX / Flax NNX."""

__version__ = "0.1.0"
