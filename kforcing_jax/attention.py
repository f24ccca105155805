"""Attention kernels and the masks they use. The one place attention masks are defined.

Scores and softmax are computed in float32 whatever the compute dtype. Layout is
(batch, heads, length, head_dim) throughout, which is also the KV-cache layout (see
platform-notes: it avoids per-step cache copies).
"""

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # Finite, so fully-masked rows (never produced by our masks) stay NaN-free.


def causal_mask(q_len: int, kv_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
  """(q_len, kv_len) bool: query i (absolute position q_offset + i) sees keys b <= that position."""
  q_pos = q_offset + jnp.arange(q_len)[:, None]
  return jnp.arange(kv_len)[None, :] <= q_pos


def dense_attention(q_BxHxLxK: jax.Array, k_BxHxSxK: jax.Array, v_BxHxSxK: jax.Array,
                    mask_LxS: jax.Array) -> jax.Array:
  """Softmax attention under an explicit boolean mask (broadcastable to (B, H, L, S))."""
  scale = q_BxHxLxK.shape[-1] ** -0.5
  s_BxHxLxS = jnp.einsum("bhlk,bhsk->bhls", q_BxHxLxK, k_BxHxSxK,
                         preferred_element_type=jnp.float32) * scale
  s_BxHxLxS = jnp.where(mask_LxS, s_BxHxLxS, NEG_INF)
  p_BxHxLxS = jax.nn.softmax(s_BxHxLxS, axis=-1).astype(v_BxHxSxK.dtype)
  return jnp.einsum("bhls,bhsk->bhlk", p_BxHxLxS, v_BxHxSxK)


def causal_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK) -> jax.Array:
  """Full causal self-attention (training path)."""
  length = q_BxHxLxK.shape[2]
  return dense_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, causal_mask(length, length))


def cached_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, cache_k_BxHxSxK, cache_v_BxHxSxK,
                     cache_len: jax.Array) -> jax.Array:
  """New queries attend to the first `cache_len` cache slots and causally to each other.

  The cache is fixed-size (S slots); slots >= cache_len hold stale or zero entries and are masked,
  so one compiled step serves every decode position.
  """
  n_new, n_slots = q_BxHxLxK.shape[2], cache_k_BxHxSxK.shape[2]
  k = jnp.concatenate([cache_k_BxHxSxK, k_BxHxLxK], axis=2)
  v = jnp.concatenate([cache_v_BxHxSxK, v_BxHxLxK], axis=2)
  mask_cache = jnp.broadcast_to(jnp.arange(n_slots)[None, :] < cache_len, (n_new, n_slots))
  mask = jnp.concatenate([mask_cache, causal_mask(n_new, n_new)], axis=1)
  return dense_attention(q_BxHxLxK, k, v, mask)
