"""Inverse-CDF sampling (spec section 4): exactness against float64, the sampled distribution,
edge cases (z = 0, z -> 1, zero-probability ids) and independence of the batch a row is in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.distill import sampling


_inverse_cdf = jax.jit(sampling.inverse_cdf)


def _ref_inverse_cdf(logits, z, probs=None):
  """float64 numpy reference: first id with cdf >= z (cdf in id order), clamped to V-1.

  `logits` (R, V), `z` (R, S) -> ids (R, S). The unnormalised probabilities are
  exp(logits - max) in float64 unless `probs` gives them. Ids with probability exactly 0 are
  skipped (a zero-width CDF bin is never sampled; this only matters at z = 0).
  """
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True)) if probs is None else np.asarray(
      probs, np.float64)
  cdf = np.cumsum(p, -1)
  cdf /= cdf[:, -1:]
  z = np.asarray(z, np.float64)
  out = np.empty(z.shape, np.int64)
  for r in range(z.shape[0]):
    ge = (cdf[r][None, :] >= z[r][:, None]) & (p[r] > 0)[None, :]
    out[r] = np.where(ge.any(-1), ge.argmax(-1), logits.shape[-1] - 1)
  return out


def _naive_f32_inverse_cdf(logits, z):
  """What a plain float32 softmax + cumsum would give (for the report only)."""
  logits = np.asarray(logits, np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)
  cdf = np.cumsum(p / p.sum(-1, keepdims=True, dtype=np.float32), -1, dtype=np.float32)
  ge = cdf[:, None, :] >= np.asarray(z, np.float32)[:, :, None]
  return np.where(ge.any(-1), ge.argmax(-1), logits.shape[-1] - 1)


@pytest.mark.parametrize("rows,v", [(64, 5000), (8, 50257)])
def test_inverse_cdf_matches_float64_reference_exactly(rows, v):
  # V = 5000 pads its last block of 128 ids; 50257 (GPT-2 + mask) uses blocks of 256.
  n_z = 200
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (rows, v), jnp.float32)
  z = jax.random.uniform(k2, (rows, n_z), jnp.float32)
  # One logits row broadcast against its 200 z (same math as repeating the row 200 times).
  got = np.asarray(_inverse_cdf(logits[:, None, :], z))
  assert got.dtype == np.int32 and got.shape == (rows, n_z)
  # Exact: float64 cumsum and comparison over the same float32 exp(logits - max) values the
  # library starts from (its double-float prefix sums claim float64 accuracy).
  e32 = jax.jit(lambda l: jnp.exp(l - l.max(-1, keepdims=True)))(logits)
  ref = _ref_inverse_cdf(np.asarray(logits), np.asarray(z), probs=np.asarray(e32))
  n_bad = int((got != ref).sum())
  # Against a softmax computed entirely in float64 (exp included), the float32 exp's 1-ulp
  # errors (~1e-9 on the CDF) move a handful of samples that sit that close to a bin edge.
  ref64 = _ref_inverse_cdf(np.asarray(logits), np.asarray(z))
  n_bad64 = int((got != ref64).sum())
  naive_bad = int((_naive_f32_inverse_cdf(np.asarray(logits), np.asarray(z)) != ref64).sum())
  msg = (f"{n_bad} of {rows * n_z} samples differ from the float64 cumsum of the same exps, "
         f"{n_bad64} from an all-float64 softmax; a naive float32 cumsum gets {naive_bad} wrong")
  print(msg)
  assert n_bad == 0, msg
  assert n_bad64 <= 4, msg


def test_inverse_cdf_matches_reference_near_bin_edges():
  """z placed (in float64) just above and below every CDF boundary of a small vocabulary, then
  rounded to float32: the double-float prefix sums resolve them like float64 does."""
  v = 300
  logits = 2.0 * jax.random.normal(jax.random.key(1), (1, v), jnp.float32)
  lg = np.asarray(logits, np.float64)
  p = np.exp(lg - lg.max())
  cdf = np.cumsum(p) / p.sum()
  z64 = np.concatenate([cdf[:-1] * (1 + 3e-7), cdf[:-1] * (1 - 3e-7)])
  z = np.clip(z64, 0, 1).astype(np.float32)[None]
  got = np.asarray(_inverse_cdf(jnp.broadcast_to(logits, (z.shape[1], v)), z[0]))
  ref = _ref_inverse_cdf(np.asarray(logits), z)[0]
  np.testing.assert_array_equal(got, ref)


def test_distribution_matches_probabilities():
  probs = np.array([0.05, 0.3, 0.0001, 0.2, 0.4489, 0.001])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  n = 200_000
  # Stratified z on a regular grid: each id gets its CDF bin's share of the grid, so counts are
  # within ~1 of n * p and TV ~ V / n; 0.005 leaves room only for a real error.
  z = (np.arange(n) + 0.5) / n
  ids = np.asarray(_inverse_cdf(jnp.broadcast_to(logits, (n, 6)),
                                                 jnp.asarray(z, jnp.float32)))
  freq = np.bincount(ids, minlength=6) / n
  tv = 0.5 * np.abs(freq - probs).sum()
  assert tv < 0.005, (tv, freq)
  assert np.abs(freq * n - probs * n).max() <= 2.0, (freq * n, probs * n)
  # Random z: Monte Carlo TV has std ~ 1e-3 at n = 200k; 0.005 is ~5 sigma.
  zr = jax.random.uniform(jax.random.key(2), (n,), jnp.float32)
  ids = np.asarray(_inverse_cdf(jnp.broadcast_to(logits, (n, 6)), zr))
  freq = np.bincount(ids, minlength=6) / n
  assert 0.5 * np.abs(freq - probs).sum() < 0.005, freq


def test_edge_cases_zero_one_and_zero_probability_ids():
  v = 12
  base = np.asarray(jax.random.normal(jax.random.key(3), (v,)), np.float32)
  rows = []
  # Leading and trailing ids have probability exactly 0 (-inf, or the -1000 mask logit).
  a = base.copy()
  a[0], a[1], a[-1], a[-2] = -1000.0, -np.inf, -np.inf, -1000.0
  rows.append(a)
  b = base.copy()
  b[0] = -1000.0  # the masked id first (a BPE tokenizer puts its specials first)
  b[5] = -np.inf
  rows.append(b)
  c = base.copy()
  c[-1] = -1000.0  # the masked id last (GPT-2 + mask)
  rows.append(c)
  logits = jnp.asarray(np.stack(rows))
  below_one = np.nextafter(np.float32(1), np.float32(0))
  zs = np.array([0.0, 1e-30, 1e-12, below_one, 1.0], np.float32)
  got = np.asarray(_inverse_cdf(logits[:, None, :].repeat(len(zs), 1),
                                        jnp.broadcast_to(jnp.asarray(zs), (3, len(zs)))))
  nonzero = [np.flatnonzero(np.exp(r - r.max()) > 0) for r in np.stack(rows)]
  for r in range(3):
    first, last = nonzero[r][0], nonzero[r][-1]
    assert got[r, 0] == first, f"row {r}: z=0 gave {got[r, 0]}, first nonzero id is {first}"
    assert got[r, 1] == first and got[r, 2] == first
    assert got[r, 3] == last, f"row {r}: z=1-ulp gave {got[r, 3]}, last nonzero id is {last}"
    # z == 1.0 (outside [0, 1)): the last id whose cdf reaches 1, or the clamp to V-1.
    assert got[r, 4] in (last, v - 1)
  # Masked / zero-probability ids are never returned, over a dense grid of z including 0.
  z = np.concatenate([[0.0], np.linspace(0, 1, 20001, dtype=np.float32)[1:-1], [below_one]])
  z = z.astype(np.float32)
  ids = np.asarray(_inverse_cdf(logits[:, None, :],
                                        jnp.broadcast_to(jnp.asarray(z), (3, len(z)))))
  for r in range(3):
    assert set(np.unique(ids[r])) <= set(nonzero[r].tolist()), (r, np.unique(ids[r]))
    assert set(np.unique(ids[r])) == set(nonzero[r].tolist())  # every live id is reachable


def test_clamp_when_cdf_never_reaches_z():
  # z slightly above 1 cannot be reached by any cdf: clamp to V-1 (spec).
  logits = jnp.zeros((1, 7), jnp.float32)
  got = sampling.inverse_cdf(logits, jnp.asarray([1.0 + 2 ** -20], jnp.float32))
  assert int(got[0]) == 6
  got = sampling.inverse_cdf(logits, jnp.asarray([1.0], jnp.float32))
  assert int(got[0]) == 6


@pytest.mark.slow
def test_row_result_independent_of_batch():
  v = 3000
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  row = 3.0 * jax.random.normal(k1, (v,), jnp.float32)
  zrow = jax.random.uniform(k2, (50,), jnp.float32)
  others = 3.0 * jax.random.normal(k3, (9, v), jnp.float32)
  f = _inverse_cdf
  alone = f(jnp.broadcast_to(row, (1, 50, v)), zrow[None])
  batch_logits = jnp.concatenate([others[:4], row[None], others[4:]])[:, None, :].repeat(50, 1)
  batch_z = jax.random.uniform(jax.random.key(5), (10, 50)).at[4].set(zrow)
  in_batch = f(batch_logits, batch_z)
  np.testing.assert_array_equal(alone[0], in_batch[4])
  # The (hi, lo) prefix sums are bitwise the same for the row at any position of batches of
  # any size >= 2. (XLA:CPU compiles the fused exp(logits - max) of a batch of ONE row
  # differently: ~3% of its exps round the other way, within 1 ulp, so there the sums agree
  # to ~1e-7 relative only; the sampled ids above still agree.)
  cdf = jax.jit(sampling.unnormalised_cdf)
  hi_a, lo_a = cdf(jnp.concatenate([row[None], others[:1]]))
  hi_b, lo_b = cdf(jnp.concatenate([others[:4], row[None], others[4:]]))
  np.testing.assert_array_equal(hi_a[0], hi_b[4])
  np.testing.assert_array_equal(lo_a[0], lo_b[4])
  hi_1, lo_1 = cdf(row[None])
  np.testing.assert_allclose(np.float64(hi_1[0]) + lo_1[0], np.float64(hi_b[4]) + lo_b[4],
                             rtol=2e-7)
