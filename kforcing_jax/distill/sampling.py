"""Inverse-CDF sampling (spec section 4): the one place the CDF is computed.

index = first vocabulary id whose cumulative probability is >= z (CDF in id order), clamped to
V-1. Targets depend on z through this CDF, so it must be accurate and reproducible: the prefix
sums are carried as float32 (hi, lo) pairs with error-free additions (TwoSum), which is as
accurate as a float64 cumsum and runs on TPUs (no float64 there). `inverse_cdf` gets there in two
levels (block sums made exact by splitting each probability on fixed grids, then one block's
prefix sums), ~2.5x faster than a V-long double-float scan at V = 8192. Every operation is elementwise
or along the vocabulary axis of one row, so a row's result never depends on the batch it is in.
"""

import flax.struct
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


_CHUNK_BITS = 12  # _exact_parts grid step; sums of up to 2^11 parts of one grid stay exact.


def _exact_parts(e: jax.Array) -> list[jax.Array]:
  """e in [0, 1] split into float32 parts on grids 2^-12, 2^-24, 2^-36 plus a remainder below
  2^-36: every split is exact, and sums of up to 2^11 parts of one grid are exact in float32 in
  any order, so float32 reductions of the parts add up to a double-float-accurate sum."""
  parts = []
  for c in range(1, 4):
    scale = float(2 ** (_CHUNK_BITS * c))
    head = jnp.floor(e * scale) / scale
    parts.append(head)
    e = e - head
  return parts + [e]


def _parts_to_df(parts: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  acc = _two_sum(parts[0], parts[1])
  for p in parts[2:]:
    acc = _df_add(acc, (p, jnp.zeros_like(p)))
  return acc


def inverse_cdf(logits_xV: jax.Array, z_x: jax.Array) -> jax.Array:
  """Token ids (int32, shape of z) sampled at temperature 1 by inverting the CDF at z.

  Two levels, so the work is a few float32 passes over V rather than a V-long double-float
  prefix scan per row: exact sums of blocks of ~sqrt(V) ids (`_exact_parts`) and their prefix
  sums pick the block holding z, then exact prefix sums inside that one block pick the id.
  `logits` may broadcast against z over the leading axes (one row, many z).
  """
  v = logits_xV.shape[-1]
  bs = 1 << max(3, (v.bit_length() + 1) // 2)  # a power of two near sqrt(V)
  if bs > 2 ** (_CHUNK_BITS - 1):
    raise ValueError(f"inverse_cdf: vocabulary of {v} ids is too large for exact block sums")
  nb = -(-v // bs)
  e = _unnormalised_probs(logits_xV)
  e = jnp.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, nb * bs - v)]).reshape(*e.shape[:-1], nb, bs)
  blk = _parts_to_df([p.sum(axis=-1) for p in _exact_parts(e)])  # (..., nb) pairs
  incl_hi, incl_lo = jax.lax.associative_scan(_df_add, blk, axis=-1)
  t_hi, t_lo = _df_mul_f((incl_hi[..., -1:], incl_lo[..., -1:]), z_x.astype(jnp.float32)[..., None])
  # A block holds the answer iff its cumulative mass reaches z and it has a nonzero id
  # (zero-probability ids, e.g. the masked one, are never returned: at z = 0 a leading one
  # would otherwise qualify).
  reach = (incl_hi > t_hi) | ((incl_hi == t_hi) & (incl_lo >= t_lo))
  ok_NB = reach & (e.max(axis=-1) > 0)
  b = jnp.argmax(ok_NB, axis=-1)  # (shape of z)
  shape = b.shape
  take = lambda x: jnp.take_along_axis(jnp.broadcast_to(x, shape + x.shape[-1:]),
                                       b[..., None], axis=-1)[..., 0]
  shift = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)])[..., :-1]
  start = (take(shift(incl_hi)), take(shift(incl_lo)))  # mass of the blocks before b
  e_blk = jnp.take_along_axis(jnp.broadcast_to(e, shape + e.shape[-2:]), b[..., None, None],
                              axis=-2)[..., 0, :]  # (..., bs)
  c_hi, c_lo = _parts_to_df([jnp.cumsum(p, axis=-1) for p in _exact_parts(e_blk)])
  c_hi, c_lo = _df_add((c_hi, c_lo), (start[0][..., None], start[1][..., None]))
  t_hi, t_lo = t_hi[..., 0], t_lo[..., 0]
  ge = (c_hi > t_hi[..., None]) | ((c_hi == t_hi[..., None]) & (c_lo >= t_lo[..., None]))
  ge = ge & (e_blk > 0)
  idx = b * bs + jnp.argmax(ge, axis=-1)
  return jnp.where(ok_NB.any(axis=-1) & ge.any(axis=-1), idx, v - 1).astype(jnp.int32)


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


def blurred_window(logits_xV: jax.Array, z_x: jax.Array, ids_x: jax.Array, sigma: float,
                   radius: int) -> tuple[jax.Array, jax.Array]:
  """Soft targets: the law of inverse_cdf(logits, z') for z' uniform on [z - sigma, z + sigma]
  clipped to [0, 1], on the 2 radius + 1 ids around ids = inverse_cdf(logits, z) (renormalised
  there; sigma -> 0: one-hot at ids). Returns (window ids, weights), each (..., 2 radius + 1).

  Bins are contiguous in id order, so the neighbours' bins follow from their probabilities and
  the lower edge of ids' own bin: one masked sum over V and O(radius) work, no V-long prefix
  sum (a dense soft target cost 15-18% of a k4 step at V = 8192, this 3%). Float32: soft
  labels only.
  """
  logits = logits_xV.astype(jnp.float32)
  v = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  below = jnp.arange(v) < ids_x[..., None]
  lower_id = jnp.where(below, jnp.exp(logits - lse), 0.0).sum(-1, keepdims=True)
  win = ids_x[..., None] + jnp.arange(-radius, radius + 1)
  valid = (win >= 0) & (win < v)
  win = jnp.clip(win, 0, v - 1)
  q = jnp.where(valid, jnp.exp(jnp.take_along_axis(logits, win, axis=-1) - lse), 0.0)
  excl = jnp.cumsum(q, axis=-1) - q  # mass of the window's ids before each one
  lower = lower_id - (excl[..., radius:radius + 1] - excl)
  z = z_x.astype(jnp.float32)[..., None]
  lo, hi = jnp.clip(z - sigma, 0.0, 1.0), jnp.clip(z + sigma, 0.0, 1.0)
  w = jnp.clip(lower + q, lo, hi) - jnp.clip(lower, lo, hi)
  total = w.sum(-1, keepdims=True)
  one_hot = (jnp.arange(2 * radius + 1) == radius).astype(jnp.float32)
  return win, jnp.where(total > 0, w / jnp.maximum(total, 1e-30), one_hot)


# ---- sampling controls: temperature (0 = greedy), top-k, top-p, min-p ----
#
# Applied in this order (as Hugging Face's and vLLM's samplers do), to the logits before the
# inverse-CDF, so the same uniform z gives the same token whatever path computes it (the AR
# decode, the lossless methods' teacher, the distillation targets). Each setting is a Python
# number (one compiled program per setting: offline decoding, training) or a per-row array
# (the server: one program for every request's settings); a Python number that switches a
# filter off removes it from the program.


def _is_const(x, value) -> bool:
  return isinstance(x, (int, float)) and x == value


def _per_row(x, ndim: int) -> jax.Array:
  """A scalar or per-row setting shaped to broadcast against (..., V) logits of `ndim` axes
  (a per-row array aligns with the leading axes)."""
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def filter_logits(logits_xV: jax.Array, top_k=0, top_p=1.0, min_p=0.0) -> jax.Array:
  """The logits with every id outside the kept set at -inf (float32).

  top_k >= 1: the ids whose logit is at least the k-th largest; top_p < 1: the smallest set of
  most probable ids whose probability reaches top_p; min_p > 0: the ids with probability at
  least min_p times the largest. Ties at a threshold are all kept, so the rule depends on the
  distribution only, never on id order. Settings broadcast against the leading axes; 0 / 1 / 0
  switch each filter off.
  """
  logits = logits_xV.astype(jnp.float32)
  off = [isinstance(top_k, int) and top_k <= 0, _is_const(top_p, 1.0), _is_const(min_p, 0.0)]
  if all(off):
    return logits
  v = logits.shape[-1]
  expand = lambda x: _per_row(x, logits.ndim)
  mx = logits.max(-1, keepdims=True)

  def apply(lg):
    keep = jnp.ones(lg.shape, bool)
    if not off[0] or not off[1]:
      srt = -jnp.sort(-lg, axis=-1)  # descending
      if not off[0]:
        k = jnp.asarray(top_k, jnp.int32)
        kth = jnp.take_along_axis(srt, expand(jnp.clip(k - 1, 0, v - 1)), axis=-1)
        keep &= (lg >= kth) | (expand(k) <= 0)  # top_k <= 0: off (vLLM's -1)
      if not off[1]:
        p = jnp.exp(srt - mx)
        cum = jnp.cumsum(p, axis=-1) / p.sum(-1, keepdims=True)
        # The first sorted id where the mass reaches top_p is the last one kept.
        last = jnp.argmax(cum >= expand(jnp.asarray(top_p, jnp.float32)), axis=-1)
        thr = jnp.take_along_axis(srt, last[..., None], axis=-1)
        keep &= (lg >= thr) | (expand(jnp.asarray(top_p)) >= 1.0)
    if not off[2]:
      keep &= lg >= mx + jnp.log(expand(jnp.asarray(min_p, jnp.float32)))
    return jnp.where(keep, lg, -jnp.inf)

  if any(isinstance(x, (int, float)) for x, o in zip((top_k, top_p, min_p), off) if not o):
    return apply(logits)
  # Per-row arrays: skip the sort unless some row asks for a filter.
  active = jnp.any(jnp.asarray(top_k) > 0) | jnp.any(jnp.asarray(top_p) < 1.0) | jnp.any(
      jnp.asarray(min_p) > 0.0)
  return jax.lax.cond(active, apply, lambda lg: lg, logits)


def _temperature_of(logits, temperature):
  """(logits / temperature with 0 taken as 1, greedy mask or None)."""
  if isinstance(temperature, (int, float)):
    return (logits if temperature in (0, 1) else logits / temperature), None
  t = _per_row(jnp.asarray(temperature, jnp.float32), logits.ndim)
  greedy = t == 0
  return logits / jnp.where(greedy, 1.0, t), greedy[..., 0]


def transformed_logits(logits_xV: jax.Array, temperature=1.0, top_k=0, top_p=1.0,
                       min_p=0.0) -> jax.Array:
  """The logits of the distribution the controls sample from (float32; filtered ids at -inf);
  temperature 0 rows come back at temperature 1 (their token is the argmax)."""
  scaled, _ = _temperature_of(logits_xV.astype(jnp.float32), temperature)
  return filter_logits(scaled, top_k, top_p, min_p)


def sample(logits_xV: jax.Array, z_x: jax.Array, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0) -> jax.Array:
  """Token ids (int32, shape of z): the argmax where temperature is 0, else the inverse-CDF at
  z of the transformed distribution."""
  if _is_const(temperature, 0):
    return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
  logits = logits_xV.astype(jnp.float32)
  scaled, greedy = _temperature_of(logits, temperature)
  y = inverse_cdf(filter_logits(scaled, top_k, top_p, min_p), z_x)
  if greedy is None:
    return y
  return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), y)


def probabilities(logits_xV: jax.Array, temperature=1.0, top_k=0, top_p=1.0,
                  min_p=0.0) -> jax.Array:
  """The distribution `sample` draws from (float32): one-hot on the argmax where temperature
  is 0 (speculative sampling accepts and corrects against it)."""
  p = jax.nn.softmax(transformed_logits(logits_xV, temperature, top_k, top_p, min_p), axis=-1)
  if isinstance(temperature, (int, float)) and temperature != 0:
    return p
  one_hot = jax.nn.one_hot(jnp.argmax(logits_xV, axis=-1), logits_xV.shape[-1],
                           dtype=jnp.float32)
  if _is_const(temperature, 0):
    return one_hot
  return jnp.where(_per_row(jnp.asarray(temperature) == 0, p.ndim), one_hot, p)


@flax.struct.dataclass
class Controls:
  """Sampling controls: Python numbers (static: hashable, one program per setting) or per-row
  arrays (B,) (traced: one program for any mix of settings). temperature 0 = greedy."""
  temperature: float | jax.Array = 1.0
  top_k: int | jax.Array = 0
  top_p: float | jax.Array = 1.0
  min_p: float | jax.Array = 0.0

  @classmethod
  def rows(cls, b: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> "Controls":
    """Per-row arrays of `b` rows, every row at the given (scalar or (b,)) settings."""
    full = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (b,))
    return cls(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
               full(min_p, jnp.float32))

  def _args(self):
    return self.temperature, self.top_k, self.top_p, self.min_p

  def sample(self, logits_xV: jax.Array, z_x: jax.Array) -> jax.Array:
    return sample(logits_xV, z_x, *self._args())

  def transformed(self, logits_xV: jax.Array) -> jax.Array:
    return transformed_logits(logits_xV, *self._args())

  def probabilities(self, logits_xV: jax.Array) -> jax.Array:
    return probabilities(logits_xV, *self._args())


class ControlFields:
  """Mixin of the decode specs (decode.DecodeSpec, speculative.VerifySpec), dataclasses with
  fields tau (the temperature), top_k, top_p and min_p."""

  @property
  def greedy(self) -> bool:
    return self.tau == 0

  @property
  def controls(self) -> Controls:
    """The spec's sampling controls (static numbers)."""
    return Controls(self.tau, self.top_k, self.top_p, self.min_p)


def active_filters(top_k=0, top_p=1.0, min_p=0.0) -> list[str]:
  """Names of the filters a setting switches on (top_k 0 or -1, top_p 1 and min_p 0 are off):
  what a PFLM, which samples through its noise, must refuse."""
  return [name for name, on in (("top_k", top_k > 0), ("top_p", top_p < 1), ("min_p", min_p > 0))
          if on]


def check_controls(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> None:
  """Raise ValueError naming the first setting out of range."""
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if int(top_k) != top_k or top_k < -1:
    raise ValueError(f"top_k must be an integer >= 0 (0 or -1: off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not 0 <= min_p <= 1:
    raise ValueError(f"min_p must be in [0, 1], got {min_p}")
