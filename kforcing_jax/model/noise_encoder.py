"""The PFLM noise encoder (spec section 2): embeds a uniform z (and tau) as a "token".

feat(s) = concat(cos(2 pi s f), sin(2 pi s f)), f_i = F * 10000^(-i / (d/2)), i = 0..d/2-1,
with F = `ModelConfig.noise_max_freq` (1 = the authors' encoder, so their checkpoints convert).
h = Linear(2d -> d)(concat(feat(z), feat(tau))); h = h + MLP(LayerNorm_with_bias(h)),
MLP = d -> 4d, exact (erf) GELU, 4d -> d.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kforcing_jax.model import layers


def _frequencies(d: int, max_freq: float) -> tuple[np.ndarray, np.ndarray]:
  """f_i = max_freq * 10000^(-i/(d/2)) as float32 hi + lo parts, hi with 11 significant bits
  (so that hi times a 13-bit s is exact in float32)."""
  f = max_freq * 10000.0 ** (-np.arange(d // 2, dtype=np.float64) / (d // 2))
  m, e = np.frexp(f)
  hi = np.ldexp(np.round(m * 2.0 ** 11), e - 11)
  return hi.astype(np.float32), (f - hi).astype(np.float32)


def sinusoidal_features(s: jax.Array, d: int, max_freq: float = 1.0) -> jax.Array:
  """(..., d) features of s in [0, 1], computed with care in float32; the highest frequency
  is `max_freq` cycles over [0, 1].

  The phase s*f is reduced modulo 1 before multiplying by 2*pi, so the argument of cos/sin is
  always in [-pi, pi]. The product is split (s = s_hi + s_lo with 12 fractional bits in s_hi,
  f = f_hi + f_lo), so that its large part s_hi*f_hi is exact and only small terms round:
  at any max_freq, a z difference of 1e-7 changes the features by ~1e-7 * 2*pi*f, as in the
  float64 reference (tested against float64 numpy to ~1e-6).
  """
  f_hi, f_lo = _frequencies(d, max_freq)
  s = s.astype(jnp.float32)[..., None]
  s_hi = jnp.round(s * 4096.0) / 4096.0
  s_lo = s - s_hi
  big = s_hi * f_hi  # exact
  phase = (big - jnp.round(big)) + (s_hi * f_lo + s_lo * (f_hi + f_lo))
  phase = phase - jnp.round(phase)
  ang = (2.0 * jnp.pi) * phase
  return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class NoiseEncoder(nnx.Module):

  def __init__(self, d: int, rngs: nnx.Rngs, max_freq: float = 1.0):
    normal = jax.nn.initializers.normal(layers.INIT_STD)
    zeros = jax.nn.initializers.zeros
    self.d = d
    self.max_freq = max_freq
    self.combined_proj = layers._param(normal, rngs.params(), (2 * d, d), ("embed2", "embed"))
    self.combined_proj_bias = layers._param(zeros, rngs.params(), (d,), ("norm",))
    self.norm_weight = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))
    self.norm_bias = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=("norm",))
    self.mlp_in = layers._param(normal, rngs.params(), (d, 4 * d), ("embed", "mlp"))
    self.mlp_in_bias = layers._param(zeros, rngs.params(), (4 * d,), ("mlp",))
    self.mlp_out = layers._param(normal, rngs.params(), (4 * d, d), ("mlp", "embed"))
    self.mlp_out_bias = layers._param(zeros, rngs.params(), (d,), ("norm",))

  def __call__(self, z: jax.Array, tau: float | jax.Array = 1.0) -> jax.Array:
    """z (...) in [0, 1) -> embeddings (..., d) in float32; tau a number, one per noise token
    (z's shape), or an array aligned with z's leading axes (one per sequence, (B,))."""
    # Only z's features take max_freq: tau is a setting, not a draw that needs resolving.
    fz = sinusoidal_features(z, self.d, self.max_freq)
    tau = jnp.asarray(tau, jnp.float32)
    if tau.ndim == 0 or tau.shape == jnp.shape(z):
      # One temperature, or one per noise token (decoding): the authors' concatenation, so
      # every decoder computes the same embedding whatever shape tau comes in.
      ft = jnp.broadcast_to(sinusoidal_features(tau, self.d), fz.shape)
      h = jnp.concatenate([fz, ft], axis=-1) @ self.combined_proj[...]
    else:  # per sequence (training): tau's half of the projection once per sequence
      tau = tau.reshape(tau.shape + (1,) * (jnp.ndim(z) - tau.ndim))
      w = self.combined_proj[...]
      h = fz @ w[:self.d] + sinusoidal_features(tau, self.d) @ w[self.d:]
    h = h + self.combined_proj_bias[...]
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    g = (h - mean) * jax.lax.rsqrt(var + layers.LN_EPS) * self.norm_weight[...] + self.norm_bias[...]
    g = jax.nn.gelu(g @ self.mlp_in[...] + self.mlp_in_bias[...], approximate=False)
    return h + g @ self.mlp_out[...] + self.mlp_out_bias[...]
