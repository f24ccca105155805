"""Backbone building blocks, exactly as the reference code (spec section 2).

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


class ScaleNorm(nnx.Module):
  """LayerNorm with a learned scale and no bias, computed in float32 whatever the input dtype."""

  def __init__(self, d: int):
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.weight[...]
    return y.astype(x_BxLxD.dtype)


def rotary_tables(pos_BxL: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables (B, 1, L, head_dim) for "rotate half" rotary embeddings, in float32."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  ang_BxLxK2 = pos_BxL.astype(jnp.float32)[..., None] * inv_freq
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
  and which query rows to finish."""

  def __init__(self, d: int, n_heads: int, mlp_ratio: int, n_layers: int, rngs: nnx.Rngs,
               dtype=jnp.float32):
    head_dim = d // n_heads
    normal = jax.nn.initializers.normal(INIT_STD)
    out_normal = jax.nn.initializers.normal(INIT_STD / (2 * n_layers) ** 0.5)
    zeros = jax.nn.initializers.zeros
    self.dtype = dtype
    self.norm1 = ScaleNorm(d)
    # Fused qkv without bias; output axis laid out (3, heads, head_dim) like the reference.
    self.attn_qkv = _param(normal, rngs.params(), (d, 3, n_heads, head_dim),
                           ("embed", None, "heads", "head_dim"))
    self.attn_out = _param(out_normal, rngs.params(), (n_heads, head_dim, d),
                           ("heads", "head_dim", "embed"))
    self.norm2 = ScaleNorm(d)
    self.mlp_in = _param(normal, rngs.params(), (d, mlp_ratio * d), ("embed", "mlp"))
    self.mlp_in_bias = _param(zeros, rngs.params(), (mlp_ratio * d,), ("mlp",))
    self.mlp_out = _param(out_normal, rngs.params(), (mlp_ratio * d, d), ("mlp", "embed"))
    self.mlp_out_bias = _param(zeros, rngs.params(), (d,), ("norm",))

  def qkv(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array):
    """Rotated q, k and plain v, each (B, H, L, head_dim)."""
    h = self.norm1(x_BxLxD).astype(self.dtype)
    # Contract into (B, L, 3, H, K), then move axes: the same products, but XLA:CPU ran an
    # einsum straight into (3, B, H, L, K) ~10x slower (it re-laid out the weight every call).
    qkv = jnp.einsum("bld,dthk->blthk", h, self.attn_qkv[...].astype(self.dtype))
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    return apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin), qkv[2]

  def finish(self, x_BxLxD: jax.Array, att_BxHxLxK: jax.Array) -> jax.Array:
    """Residual adds of the attention output and the MLP."""
    x = x_BxLxD + jnp.einsum("bhlk,hkd->bld", att_BxHxLxK,
                             self.attn_out[...].astype(self.dtype)).astype(x_BxLxD.dtype)
    h = self.norm2(x).astype(self.dtype)
    h = h @ self.mlp_in[...].astype(self.dtype) + self.mlp_in_bias[...].astype(self.dtype)
    h = jax.nn.gelu(h, approximate=True)
    h = h @ self.mlp_out[...].astype(self.dtype) + self.mlp_out_bias[...].astype(self.dtype)
    return x + h.astype(x.dtype)

