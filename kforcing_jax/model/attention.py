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


def _grouped(q_BxHxLxK: jax.Array, n_kv_heads: int) -> jax.Array:
  """Queries (B, Hkv, G, L, K) for grouped-query attention: query head h uses kv head h // G."""
  b, h, l, k = q_BxHxLxK.shape
  return q_BxHxLxK.reshape(b, n_kv_heads, h // n_kv_heads, l, k)


def dense_attention(q_BxHxLxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array,
                    mask_LxS: jax.Array) -> jax.Array:
  """Softmax attention under an explicit boolean mask (broadcastable to (B, H, L, S)).

  Keys/values may have fewer heads than the queries (grouped-query attention): they are never
  repeated, so a decode step reads the KV cache at its own (smaller) size."""
  scale = q_BxHxLxK.shape[-1] ** -0.5
  n_kv = k_BxGxSxK.shape[1]
  if n_kv != q_BxHxLxK.shape[1]:
    q = _grouped(q_BxHxLxK, n_kv)
    mask = mask_LxS[..., None, :, :] if jnp.ndim(mask_LxS) == 4 else mask_LxS
    s = jnp.einsum("bhglk,bhsk->bhgls", q, k_BxGxSxK, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask, s, NEG_INF), axis=-1).astype(v_BxGxSxK.dtype)
    return jnp.einsum("bhgls,bhsk->bhglk", p, v_BxGxSxK).reshape(q_BxHxLxK.shape)
  s_BxHxLxS = jnp.einsum("bhlk,bhsk->bhls", q_BxHxLxK, k_BxGxSxK,
                         preferred_element_type=jnp.float32) * scale
  s_BxHxLxS = jnp.where(mask_LxS, s_BxHxLxS, NEG_INF)
  p_BxHxLxS = jax.nn.softmax(s_BxHxLxS, axis=-1).astype(v_BxGxSxK.dtype)
  return jnp.einsum("bhls,bhsk->bhlk", p_BxHxLxS, v_BxGxSxK)


def causal_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK) -> jax.Array:
  """Full causal self-attention (training path)."""
  length = q_BxHxLxK.shape[2]
  return dense_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, causal_mask(length, length))


def decode_mask(start: jax.Array, pad_B: jax.Array, n_new: int, n_keys: int) -> jax.Array:
  """(B, 1, n_new, n_keys) bool mask of W new positions written at cache slots start..start+W-1.

  `start` is () or per row (B,): rows of a ragged batch sit at different cache lengths. Slot-
  causal (a key slot <= the query's slot), and never a row's left padding (slots < pad_B[b]).
  Slots beyond a row's length hold stale entries; they lie after every query, so are masked.
  """
  slot_BxW = jnp.broadcast_to(start, pad_B.shape)[:, None] + jnp.arange(n_new, dtype=jnp.int32)
  key_S = jnp.arange(n_keys, dtype=jnp.int32)
  return ((key_S[None, None, :] <= slot_BxW[:, :, None])
          & (key_S[None, None, :] >= pad_B[:, None, None]))[:, None]


def span_mask(lo_B: jax.Array, hi_B: jax.Array, n_keys: int) -> jax.Array:
  """(B, 1, 1, n_keys) bool: bidirectional attention (the MDLM). Every query of row b sees every
  key of its span [lo_B[b], hi_B[b]) and nothing else: a left-padded prompt starts at lo = its
  padding, a sequence cut short in training ends at hi, so neither reads what is not there."""
  key_S = jnp.arange(n_keys, dtype=jnp.int32)
  return ((key_S[None, :] >= lo_B[:, None]) & (key_S[None, :] < hi_B[:, None]))[:, None, None]


def attention_mass(q_BxHxLxK: jax.Array, k_BxGxSxK: jax.Array, mask: jax.Array,
                   to_BxS: jax.Array) -> jax.Array:
  """(B, L): the share of each query's attention (softmax under `mask`, averaged over heads)
  that falls on the keys where to_BxS is True. The MDLM decoder's attention-discounted
  reranking reads it: a prediction that attends to still-masked positions rests on unknowns."""
  b, h, l, k = q_BxHxLxK.shape
  q = _grouped(q_BxHxLxK, k_BxGxSxK.shape[1])  # (B, Hkv, G, L, K); G = 1 without grouping
  s = jnp.einsum("bhglk,bhsk->bhgls", q, k_BxGxSxK, preferred_element_type=jnp.float32)
  m = mask[..., None, :, :] if jnp.ndim(mask) == 4 else mask
  p = jax.nn.softmax(jnp.where(m, s * k ** -0.5, NEG_INF), axis=-1)
  return (p * to_BxS[:, None, None, None, :]).sum(-1).reshape(b, h, l).mean(1)


# ---- PFLM two-stream attention (spec section 3) ----
#
# Every context position t owns a window of W tokens (noise tokens, or tokens produced in earlier
# rollout rounds followed by noise) at rotary positions t+1..t+W. A window token (t, i) may see
# context tokens b <= t ("staircase") and tokens (t, i') of its own window with i' <= i.


def window_attention(q_BxHxNxWxK: jax.Array, kc_BxHxNxK: jax.Array, vc_BxHxNxK: jax.Array,
                     kw_BxHxNxWxK: jax.Array, vw_BxHxNxWxK: jax.Array,
                     valid_W: jax.Array | None = None, q_slot0: jax.Array | int = 0) -> jax.Array:
  """Efficient form: O(N*W*N + N*W*W) scores, one softmax across context and window keys.

  `valid_W` masks window slots that hold nothing yet (fixed-size rollout buffers). The queries
  are window slots q_slot0, q_slot0 + 1, ...; the keys are slots 0.. of the window: fewer
  queries than keys is a rollout round that reads earlier rounds' cached keys.
  """
  n, w = q_BxHxNxWxK.shape[2], kw_BxHxNxWxK.shape[3]
  q_slots = q_slot0 + jnp.arange(q_BxHxNxWxK.shape[3])
  scale = q_BxHxNxWxK.shape[-1] ** -0.5
  n_kv = kc_BxHxNxK.shape[1]
  grouped = n_kv != q_BxHxNxWxK.shape[1]
  # Grouped-query attention: queries (B, Hkv, G, N, W, K) against the Hkv key heads.
  q = (q_BxHxNxWxK.reshape(q_BxHxNxWxK.shape[0], n_kv, -1, *q_BxHxNxWxK.shape[2:]) if grouped
       else q_BxHxNxWxK)
  g = "g" if grouped else ""
  s_ctx = jnp.einsum(f"bh{g}nwk,bhsk->bh{g}nws", q, kc_BxHxNxK,
                     preferred_element_type=jnp.float32) * scale
  s_win = jnp.einsum(f"bh{g}nwk,bhnuk->bh{g}nwu", q, kw_BxHxNxWxK,
                     preferred_element_type=jnp.float32) * scale
  stair_Nx1xS = (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None])[:, None, :]
  win_WxU = jnp.arange(w)[None, :] <= q_slots[:, None]
  if valid_W is not None:
    win_WxU = win_WxU & valid_W[None, :]
  s_ctx = jnp.where(stair_Nx1xS, s_ctx, NEG_INF)
  s_win = jnp.where(win_WxU, s_win, NEG_INF)
  p = jax.nn.softmax(jnp.concatenate([s_ctx, s_win], axis=-1), axis=-1)
  p_ctx, p_win = p[..., :n].astype(vc_BxHxNxK.dtype), p[..., n:].astype(vw_BxHxNxWxK.dtype)
  out = (jnp.einsum(f"bh{g}nws,bhsk->bh{g}nwk", p_ctx, vc_BxHxNxK)
         + jnp.einsum(f"bh{g}nwu,bhnuk->bh{g}nwk", p_win, vw_BxHxNxWxK))
  return out.reshape(q_BxHxNxWxK.shape)


def two_stream_dense_mask(n: int, w: int, valid_W: jax.Array | None = None) -> jax.Array:
  """Reference (N + N*W)^2 mask over [context ; window tokens flattened (t, i)]. Tests only."""
  ctx = jnp.arange(n)
  t = jnp.repeat(ctx, w)
  i = jnp.tile(jnp.arange(w), n)
  valid = jnp.ones((w,), bool) if valid_W is None else valid_W
  cc = ctx[None, :] <= ctx[:, None]
  cw = jnp.zeros((n, n * w), bool)
  wc = ctx[None, :] <= t[:, None]
  ww = (t[None, :] == t[:, None]) & (i[None, :] <= i[:, None]) & valid[i][None, :]
  return jnp.concatenate([jnp.concatenate([cc, cw], 1), jnp.concatenate([wc, ww], 1)], 0)
