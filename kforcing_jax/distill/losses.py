"""Losses. Cross-entropy is computed from float32 logits with an explicit log-sum-exp."""

import jax
import jax.numpy as jnp

from kforcing_jax.model import transformer as model_lib


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-position negative log-likelihood (B, L)."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  picked_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - picked_BxL


def soft_token_nll(logits_BxLxV: jax.Array, ids_BxLxW: jax.Array,
                   weights_BxLxW: jax.Array) -> jax.Array:
  """Per-position cross-entropy against a distribution on W ids per position (B, L)."""
  logits = logits_BxLxV.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, ids_BxLxW, axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - (weights_BxLxW * picked).sum(-1)


def next_token_loss(model: model_lib.Transformer, tokens_BxL: jax.Array):
  """AR teacher loss: mean NLL of tokens[1:] given tokens[:-1]; aux = {'accuracy'}."""
  logits = model(tokens_BxL[:, :-1])
  targets = tokens_BxL[:, 1:]
  nll = token_nll(logits, targets).mean()
  acc = (logits.argmax(-1) == targets).mean()
  return nll, {"accuracy": acc}
