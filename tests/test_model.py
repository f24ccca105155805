"""Backbone: causality through gradients, cached vs uncached forward, the masked logit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kforcing_jax.model import attention
from kforcing_jax.model import transformer as model_lib

CFG = model_lib.ModelConfig(vocab_size=97, mask_id=96, d_model=64, n_layers=2, n_heads=4)


def _model_and_params(cfg=CFG, seed=0):
  with nnx.use_eager_sharding(False):
    m = model_lib.Transformer(cfg, nnx.Rngs(seed))
  graphdef, params = model_lib.split_params(m)
  # The head is zero-initialised (spec); give it values so logits depend on the input.
  params["head"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), params["head"].shape)
  return graphdef, params


def test_parameter_layout_matches_spec():
  _, params = _model_and_params()
  d, v, f = CFG.d_model, CFG.vocab_size, CFG.mlp_ratio * CFG.d_model
  assert params["vocab_embed"].shape == (v, d)
  blk = params["blocks"][0]
  assert blk["attn_qkv"].shape == (d, 3, CFG.n_heads, CFG.head_dim)
  assert blk["attn_out"].shape == (CFG.n_heads, CFG.head_dim, d)
  assert blk["mlp_in"].shape == (d, f) and blk["mlp_in_bias"].shape == (f,)
  assert blk["mlp_out"].shape == (f, d) and blk["mlp_out_bias"].shape == (d,)
  assert set(blk["norm1"]) == {"weight"}  # scale-only norm, no bias
  assert params["head"].shape == (d, v) and params["head_bias"].shape == (v,)
  # Fresh head is zero-initialised, so a fresh model predicts uniformly (except the mask id).
  with nnx.use_eager_sharding(False):
    fresh = model_lib.Transformer(CFG, nnx.Rngs(0))
  logits = fresh(jnp.zeros((1, 3), jnp.int32))
  np.testing.assert_array_equal(logits[..., :CFG.mask_id], 0.0)


def test_mask_token_logit_is_forced():
  graphdef, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.mask_id)
  logits = model_lib.merge(graphdef, params)(tokens)
  np.testing.assert_array_equal(logits[..., CFG.mask_id], model_lib.MASKED_LOGIT)
  assert (logits[..., :CFG.mask_id] > -100).all()


@pytest.mark.slow
def test_causality_gradients_exactly_zero_after_t():
  graphdef, params = _model_and_params()
  length = 12
  tokens = jax.random.randint(jax.random.key(4), (1, length), 0, CFG.mask_id)
  m = model_lib.merge(graphdef, params)
  x = m.embed(tokens)

  def out_at(x, t):
    pos = jnp.arange(length)[None]
    h, _ = m.run_blocks(x, pos, lambda i, q, k, v: attention.causal_attention(q, k, v))
    return m.logits(h)[0, t].sum()

  for t in (0, 5, length - 1):
    g = jax.grad(out_at)(x, t)[0]  # (L, D)
    per_pos = jnp.abs(g).sum(-1)
    assert (per_pos[t + 1:] == 0).all(), f"position {t} sees the future"
    assert (per_pos[: t + 1] > 0).all(), f"position {t} ignores its past"


def test_cached_decode_equals_full_forward():
  graphdef, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(5), (3, 14), 0, CFG.mask_id)
  full = jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t))(params, tokens)

  @jax.jit
  def cached(p, t):
    m = model_lib.merge(graphdef, p)
    ck, cv = model_lib.init_cache(CFG, t.shape[0], 32)
    h, ck, cv = m.forward_cached(m.embed(t[:, :5]), ck, cv, 0, fresh=True)  # prefill
    outs = [m.logits(h)]
    for i in range(5, 14, 3):  # then blocks of 3 new tokens
      h, ck, cv = m.forward_cached(m.embed(t[:, i:i + 3]), ck, cv, i)
      outs.append(m.logits(h))
    return jnp.concatenate(outs, axis=1)

  got = cached(params, tokens)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_ragged_cached_rows_equal_their_own_full_forward():
  """Per-row cache lengths (ragged batches: speculative decoding, serving slots): each row at its
  own start and left padding gives its own uncached logits, whatever the other rows hold."""
  graphdef, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(7), (3, 12), 0, CFG.mask_id)
  pad = jnp.array([0, 2, 1], jnp.int32)
  start = jnp.array([5, 8, 6], jnp.int32)  # row b has filled slots [0, start_b)

  @jax.jit
  def cached(p, t):
    m = model_lib.merge(graphdef, p)
    ck, cv = model_lib.init_cache(CFG, 3, 24)
    h, ck, cv = m.forward_cached(m.embed(t), ck, cv, 0, pad, fresh=True)  # junk past each length
    h, _, _ = m.forward_cached(m.embed(t[:, :3]), ck, cv, start, pad)
    return m.logits(h)

  got = cached(params, tokens)
  m = model_lib.merge(graphdef, params)
  for b in range(3):
    s, p0 = int(start[b]), int(pad[b])
    # Row b's real tokens: slots p0..s-1 of the prefill, then the 3 new ones.
    seq = jnp.concatenate([tokens[b, p0:s], tokens[b, :3]])[None]
    want = m(seq)[0, -3:]
    np.testing.assert_allclose(got[b], want, atol=2e-5, rtol=2e-5)


def test_cache_drops_positions_not_kept():
  """Positions past a row's length (the PFLM's noise tokens) are overwritten, never seen."""
  graphdef, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, CFG.mask_id)

  @jax.jit
  def run(p, t, junk):
    m = model_lib.merge(graphdef, p)
    ck, cv = model_lib.init_cache(CFG, 2, 16)
    _, ck, cv = m.forward_cached(m.embed(jnp.concatenate([t[:, :4], junk], 1)), ck, cv, 0)
    h, _, _ = m.forward_cached(m.embed(t[:, 4:]), ck, cv, 4)  # overwrites the junk's slots
    return m.logits(h)

  a = run(params, tokens, jnp.zeros((2, 3), jnp.int32))
  b = run(params, tokens, jnp.full((2, 3), 7, jnp.int32))
  np.testing.assert_array_equal(a, b)
  full = model_lib.merge(graphdef, params)(tokens)
  np.testing.assert_allclose(a, full[:, 4:], atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32():
  cfg16 = model_lib.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  graphdef, params = _model_and_params()
  graphdef16, _ = _model_and_params(cfg16)
  tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, CFG.mask_id)
  l32 = model_lib.merge(graphdef, params)(tokens)
  l16 = model_lib.merge(graphdef16, params)(tokens)
  assert l16.dtype == jnp.float32  # logits stay float32
  p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16)
  assert float(jnp.abs(p32 - p16).sum(-1).max()) < 0.1


def test_run_blocks_keep_last_equals_the_full_pass_sliced():
  """Decoding finishes only the rows that feed the head in the last block; those rows and every
  layer's keys/values must equal the full pass."""
  graphdef, params = _model_and_params()
  m = model_lib.merge(graphdef, params)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.mask_id)
  x, pos = m.embed(tokens), jnp.broadcast_to(jnp.arange(9), (2, 9))

  def attend(i, q, k, v):
    mask = attention.causal_mask(9, 9)[-q.shape[2]:]  # the queries are the last rows
    return attention.dense_attention(q, k, v, mask)

  h_full, kv_full = m.run_blocks(x, pos, attend)
  h_last, kv_last = m.run_blocks(x, pos, attend, keep_last=3)
  assert h_last.shape == (2, 3, CFG.d_model)
  np.testing.assert_allclose(h_last, h_full[:, -3:], atol=1e-5, rtol=1e-5)
  for (k1, v1), (k2, v2) in zip(kv_full, kv_last):
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)
