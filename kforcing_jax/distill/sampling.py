"""Inverse-CDF sampling (spec section 4): the one place the CDF is computed.

index = first vocabulary id whose cumulative probability is >= z (CDF in id order), clamped to
V-1. Targets depend on z through this CDF, so it must be accurate and reproducible: the prefix
sums are carried as float32 (hi, lo) pairs with error-free additions (TwoSum), which is as
accurate as a float64 cumsum and runs on TPUs (no float64 there). Every operation is elementwise
or along the vocabulary axis of one row, so a row's result never depends on the batch it is in.
"""

import jax
import jax.numpy as jnp


def _two_sum(a, b):
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  return s, err


def _df_add(x, y):
  """(hi, lo) + (hi, lo) -> normalised (hi, lo)."""
  s, e = _two_sum(x[0], y[0])
  e = e + (x[1] + y[1])
  hi = s + e
  return hi, e - (hi - s)


def _df_mul_f(x, f):
  """(hi, lo) * float32 f, with the product's rounding error recovered by Dekker splitting."""
  p = x[0] * f
  split = 4097.0  # 2^12 + 1 splits a float32 mantissa into two 12-bit halves.
  def halves(a):
    t = split * a
    hi = t - (t - a)
    return hi, a - hi
  ah, al = halves(x[0])
  bh, bl = halves(f)
  err = ((ah * bh - p) + ah * bl + al * bh) + al * bl
  e = err + x[1] * f
  hi = p + e
  return hi, e - (hi - p)


def _unnormalised_probs(logits_xV: jax.Array) -> jax.Array:
  logits = logits_xV.astype(jnp.float32)
  return jnp.exp(logits - logits.max(axis=-1, keepdims=True))


def unnormalised_cdf(logits_xV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Prefix sums of exp(logits - max) along the last axis, as (hi, lo) float32 pairs."""
  e = _unnormalised_probs(logits_xV)
  return jax.lax.associative_scan(_df_add, (e, jnp.zeros_like(e)), axis=-1)


def inverse_cdf(logits_xV: jax.Array, z_x: jax.Array) -> jax.Array:
  """Token ids (int32, shape of z) sampled at temperature 1 by inverting the CDF at z."""
  c_hi, c_lo = unnormalised_cdf(logits_xV)
  t_hi, t_lo = _df_mul_f((c_hi[..., -1:], c_lo[..., -1:]), z_x.astype(jnp.float32)[..., None])
  ge = (c_hi > t_hi) | ((c_hi == t_hi) & (c_lo >= t_lo))
  # Ids of probability 0 (the masked id: logit MASKED_LOGIT = -1000, exp underflows to 0) have
  # empty bins, but at z = 0 a leading one still has cdf >= z: exclude them (for z > 0 the
  # first id reaching z is never one).
  ge = ge & (_unnormalised_probs(logits_xV) > 0)
  first = jnp.argmax(ge, axis=-1)
  return jnp.where(ge.any(axis=-1), first, logits_xV.shape[-1] - 1).astype(jnp.int32)


def cdf_bin(logits_xV: jax.Array, ids_x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[lo, hi) of the z interval that `inverse_cdf` maps to each id (float32)."""
  c_hi, c_lo = unnormalised_cdf(logits_xV)
  cdf = (c_hi + c_lo) / (c_hi[..., -1:] + c_lo[..., -1:])
  upper = jnp.take_along_axis(cdf, ids_x[..., None], axis=-1)[..., 0]
  prev = jnp.take_along_axis(cdf, jnp.maximum(ids_x - 1, 0)[..., None], axis=-1)[..., 0]
  lower = jnp.where(ids_x == 0, 0.0, prev)
  return lower, upper


def invert_noise(logits_xV: jax.Array, ids_x: jax.Array, u_x: jax.Array) -> jax.Array:
  """Noise-inversion baseline (PTP): a z inside the CDF bin of `ids` (u ~ U(0,1) picks where).

  The z is nudged into the bin's interior so that float32 rounding keeps inverse_cdf(z) == id
  whenever the bin is wider than a few ulps.
  """
  lower, upper = cdf_bin(logits_xV, ids_x)
  width = upper - lower
  z = lower + width * (0.001 + 0.998 * u_x)
  return jnp.clip(z, 0.0, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))
