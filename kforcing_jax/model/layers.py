"""Backbone building blocks: the reference code's (spec section 2) and the Llama-family options.

Parameters carry LOGICAL axis names (`out_sharding` metadata); `sharding.py` maps them to mesh
axes. Kernels are stored (in, out) and head-structured where that keeps tensor parallelism local.
"""

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5
INIT_STD = 0.02


def _param(init, key, shape, names, dtype=jnp.float32) -> nnx.Param:
  return nnx.Param(init(key, shape, dtype), out_sharding=names)


class Norm(nnx.Module):
  """Pre-norm with a learned scale, computed in float32 whatever the input dtype.

  kind "scale": LayerNorm without bias (the authors' backbone); "rms": RMSNorm (Llama family).
  """

  def __init__(self, d: int, kind: str = "scale", eps: float = LN_EPS):
    self.kind, self.eps = kind, eps
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    if self.kind == "rms":
      y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    else:
      mean = x.mean(-1, keepdims=True)
      var = jnp.square(x - mean).mean(-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...]).astype(x_BxLxD.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: tuple = ()) -> jax.Array:
  """Rotary inverse frequencies 1 / base^(2i / head_dim), float32.

  scaling = (factor, low_freq_factor, high_freq_factor, original_max_positions): Llama-3's
  "llama3" rope scaling (long wavelengths divided by factor, short ones kept, a smooth ramp
  between); () = none."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if not scaling:
    return inv_freq
  factor, low, high, original = scaling
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (original / wavelen - low) / (high - low)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen > original / low, inv_freq / factor,
                   jnp.where(wavelen < original / high, inv_freq, mid))


def rotary_tables(pos_BxL: jax.Array, inv_freq_K2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables (B, 1, L, head_dim) for "rotate half" rotary embeddings, in float32."""
  ang_BxLxK2 = pos_BxL.astype(jnp.float32)[..., None] * inv_freq_K2
  ang = jnp.concatenate([ang_BxLxK2, ang_BxLxK2], axis=-1)[:, None]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x_BxHxLxK: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  x = x_BxHxLxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxHxLxK.dtype)


class Block(nnx.Module):
  """Pre-norm block: x += attn_out(attend(rope(qkv(norm1 x)))); x += mlp(norm2 x).

  Split into `qkv` and `finish` so the caller (`Transformer.run_blocks`) picks the attention
  and which query rows to finish. `cfg` is a `transformer.ModelConfig`: the authors' layout
  (fused qkv, GELU MLP with biases) or the Llama-family options (grouped-query attention with
  separate q and kv kernels, q/k/v biases, SwiGLU).
  """

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, h, hkv, k, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_width
    normal = jax.nn.initializers.normal(INIT_STD)
    out_normal = jax.nn.initializers.normal(INIT_STD / (2 * cfg.n_layers) ** 0.5)
    zeros = jax.nn.initializers.zeros
    self.dtype = jnp.dtype(cfg.dtype)
    self.grouped, self.qkv_bias, self.mlp_kind = hkv != h, cfg.qkv_bias, cfg.mlp
    self.norm1 = Norm(d, cfg.norm, cfg.norm_eps)
    if self.grouped:  # q (d, H, K) and k/v (d, 2, Hkv, K): the kv heads are fewer.
      self.attn_q = _param(normal, rngs.params(), (d, h, k), ("embed", "heads", "head_dim"))
      self.attn_kv = _param(normal, rngs.params(), (d, 2, hkv, k),
                            ("embed", None, "kv_heads", "head_dim"))
      if cfg.qkv_bias:
        self.attn_q_bias = _param(zeros, rngs.params(), (h, k), ("heads", "head_dim"))
        self.attn_kv_bias = _param(zeros, rngs.params(), (2, hkv, k),
                                   (None, "kv_heads", "head_dim"))
    else:  # Fused qkv; output axis laid out (3, heads, head_dim) like the reference.
      self.attn_qkv = _param(normal, rngs.params(), (d, 3, h, k),
                             ("embed", None, "heads", "head_dim"))
      if cfg.qkv_bias:
        self.attn_qkv_bias = _param(zeros, rngs.params(), (3, h, k),
                                    (None, "heads", "head_dim"))
    self.attn_out = _param(out_normal, rngs.params(), (h, k, d), ("heads", "head_dim", "embed"))
    self.norm2 = Norm(d, cfg.norm, cfg.norm_eps)
    if self.mlp_kind == "swiglu":
      self.mlp_gate = _param(normal, rngs.params(), (d, f), ("embed", "mlp"))
    self.mlp_in = _param(normal, rngs.params(), (d, f), ("embed", "mlp"))
    self.mlp_out = _param(out_normal, rngs.params(), (f, d), ("mlp", "embed"))
    if self.mlp_kind == "gelu":
      self.mlp_in_bias = _param(zeros, rngs.params(), (f,), ("mlp",))
      self.mlp_out_bias = _param(zeros, rngs.params(), (d,), ("norm",))

  def _w(self, name: str) -> jax.Array:
    return getattr(self, name)[...].astype(self.dtype)

  def qkv(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array):
    """Rotated q (B, H, L, head_dim), rotated k and plain v (B, Hkv, L, head_dim)."""
    h = self.norm1(x_BxLxD).astype(self.dtype)
    if self.grouped:
      q = jnp.einsum("bld,dhk->blhk", h, self._w("attn_q"))
      kv = jnp.einsum("bld,dthk->blthk", h, self._w("attn_kv"))
      if self.qkv_bias:
        q, kv = q + self._w("attn_q_bias"), kv + self._w("attn_kv_bias")
      q, kv = q.transpose(0, 2, 1, 3), kv.transpose(2, 0, 3, 1, 4)
      return apply_rotary(q, cos, sin), apply_rotary(kv[0], cos, sin), kv[1]
    # Contract into (B, L, 3, H, K), then move axes: the same products, but XLA:CPU ran an
    # einsum straight into (3, B, H, L, K) ~10x slower (it re-laid out the weight every call).
    qkv = jnp.einsum("bld,dthk->blthk", h, self._w("attn_qkv"))
    if self.qkv_bias:
      qkv = qkv + self._w("attn_qkv_bias")
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    return apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin), qkv[2]

  def finish(self, x_BxLxD: jax.Array, att_BxHxLxK: jax.Array) -> jax.Array:
    """Residual adds of the attention output and the MLP."""
    x = x_BxLxD + jnp.einsum("bhlk,hkd->bld", att_BxHxLxK,
                             self._w("attn_out")).astype(x_BxLxD.dtype)
    h = self.norm2(x).astype(self.dtype)
    if self.mlp_kind == "swiglu":
      h = jax.nn.silu(h @ self._w("mlp_gate")) * (h @ self._w("mlp_in"))
      h = h @ self._w("mlp_out")
    else:
      h = h @ self._w("mlp_in") + self._w("mlp_in_bias")
      h = jax.nn.gelu(h, approximate=True)
      h = h @ self._w("mlp_out") + self._w("mlp_out_bias")
    return x + h.astype(x.dtype)
