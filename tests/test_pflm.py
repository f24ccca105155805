"""PFLM student (spec sections 2-3 and 5): efficient two-stream attention against the dense-mask
reference, the attention rules through exact-zero gradients, the context stream = the AR model,
the noise encoder's features, `init_from`, and cached decoding against the window pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kforcing_jax.model import attention
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.model.noise_encoder import sinusoidal_features

CFG = model_lib.ModelConfig(vocab_size=61, mask_id=60, d_model=32, n_layers=2, n_heads=2)
TOL = dict(atol=1e-5, rtol=1e-5)


def _randomise_head(params, seed):
  # The head is zero-initialised (spec); give it values so logits depend on the input.
  params["head"] = 0.5 * jax.random.normal(jax.random.key(seed + 100), params["head"].shape)
  params["head_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 101),
                                                params["head_bias"].shape)
  return params


def _pflm(cfg=CFG, seed=0):
  with nnx.use_eager_sharding(False):
    m = pflm_lib.PFLM(cfg, nnx.Rngs(seed))
  graphdef, params = model_lib.split_params(m)
  return graphdef, _randomise_head(params, seed)


def _ar(cfg=CFG, seed=0):
  with nnx.use_eager_sharding(False):
    m = model_lib.Transformer(cfg, nnx.Rngs(seed))
  graphdef, params = model_lib.split_params(m)
  return graphdef, _randomise_head(params, seed)


def _tokens(key, b, n, cfg=CFG):
  return jax.random.randint(jax.random.key(key), (b, n), 0, cfg.mask_id, jnp.int32)


def _jit(graphdef, fn):
  """jit of fn(model, *args) taking the params dict first (everything runs compiled)."""
  return jax.jit(lambda params, *args: fn(model_lib.merge(graphdef, params), *args))


def _context_kvs_from_embeddings(m, x_BxNxD):
  """`context_pass` starting from embeddings (so they can be differentiated)."""
  b, n, _ = x_BxNxD.shape
  pos = jnp.broadcast_to(jnp.arange(n), (b, n))
  return m.run_blocks(x_BxNxD, pos, lambda i, q, k, v: attention.causal_attention(q, k, v))


# ---- efficient two-stream attention == dense (N + N*k)^2 mask ----


@pytest.mark.parametrize("n,k", [(1, 1), (5, 2), (8, 4), (13, 3)])
def test_efficient_two_stream_attention_equals_dense_mask(n, k):
  graphdef, params = _pflm()
  tokens = _tokens(n * 10 + k, 2, n)
  z = jax.random.uniform(jax.random.key(n + 7 * k), (2, n, k))
  x = jax.random.normal(jax.random.key(k), (2, n, k, CFG.d_model))
  n_valid = max(1, k - 1)
  valid = jnp.arange(k) < n_valid  # window slots >= n_valid hold nothing yet (rollout buffers)

  @jax.jit
  def run(p, tokens, z, x):
    m = model_lib.merge(graphdef, p)
    _, kvs = m.context_pass(tokens)
    return (m.noise_logits(tokens, z), m.noise_logits(tokens, z, dense=True),
            m.window_pass(kvs, x, valid), m.window_pass_dense(tokens, x, valid))

  fast, dense, h_fast, h_dense = run(params, tokens, z, x)
  assert fast.shape == (2, n, k, CFG.vocab_size)
  np.testing.assert_allclose(fast, dense, **TOL)
  assert float(jnp.std(fast[..., :CFG.mask_id])) > 0.1  # non-trivial logits
  np.testing.assert_array_equal(fast[..., CFG.mask_id], model_lib.MASKED_LOGIT)
  # window_pass with a valid-slot mask vs the dense reference with the same mask.
  assert h_fast.shape == (2, n, k, CFG.d_model)
  np.testing.assert_allclose(h_fast, h_dense, **TOL)
  # Masked slots hold nothing: whatever is in them, the valid slots' outputs do not change...
  x2 = x.at[:, :, n_valid:].set(jax.random.normal(jax.random.key(99), x[:, :, n_valid:].shape))
  _, _, h_fast2, h_dense2 = run(params, tokens, z, x2)
  np.testing.assert_array_equal(h_fast2[:, :, :n_valid], h_fast[:, :, :n_valid])
  np.testing.assert_array_equal(h_dense2[:, :, :n_valid], h_dense[:, :, :n_valid])
  if n_valid < k:  # ... while the masked slots' own outputs do depend on them (can fail)
    assert float(jnp.abs(h_fast2[:, :, n_valid:] - h_fast[:, :, n_valid:]).max()) > 1e-3


@pytest.mark.parametrize("n,k,chunks", [(6, 3, (1, 1, 1)), (9, 4, (1, 2, 1))])
def test_cached_window_pass_equals_full_window_pass(n, k, chunks):
  """Feeding the window in chunks through a window cache (the AR rollout's rounds) gives the
  hidden states of one full window pass."""
  graphdef, params = _pflm()
  tokens = _tokens(n + 31 * k, 2, n)
  x = jax.random.normal(jax.random.key(n * k), (2, n, k, CFG.d_model))

  @jax.jit
  def run(p, tokens, x):
    m = model_lib.merge(graphdef, p)
    _, kvs = m.context_pass(tokens)
    full = m.window_pass(kvs, x)
    cache, outs, start = m.init_window_cache(2, n, k), [], 0
    for c in chunks:
      h, cache = m.window_pass(kvs, x[:, :, start:start + c], cache=cache, start=start)
      outs.append(h)
      start += c
    return full, jnp.concatenate(outs, axis=2)

  full, chunked = run(params, tokens, x)
  np.testing.assert_allclose(chunked, full, **TOL)


# ---- the attention rules, through gradients ----


def _dense_window_hidden(m, xc, xw):
  """[context ; windows] as one sequence under the dense reference mask, from embeddings."""
  b, n, k, d = xw.shape
  x = jnp.concatenate([xc, xw.reshape(b, n * k, d)], axis=1)
  pos_w = (jnp.arange(n)[:, None] + 1 + jnp.arange(k)[None, :]).reshape(1, n * k)
  pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(n)[None], pos_w], axis=1), (b, n + n * k))
  mask = attention.two_stream_dense_mask(n, k)
  h, _ = m.run_blocks(x, pos, lambda l, q, kk, v: attention.dense_attention(q, kk, v, mask))
  return h[:, :n], h[:, n:].reshape(b, n, k, d)


@pytest.mark.slow
def test_mask_semantics_via_exact_zero_gradients():
  n, k = 5, 3
  graphdef, params = _pflm()
  tokens = _tokens(21, 1, n)
  z = jax.random.uniform(jax.random.key(22), (1, n, k))
  proj = jax.random.normal(jax.random.key(23), (CFG.vocab_size,))

  @jax.jit
  def jacobians(params):
    m = model_lib.merge(graphdef, params)
    xc, xw = m.embed(tokens), m.noise_encoder(z)

    def out_fast(xc, xw):  # (N, k): a random projection of every noise token's logits
      _, kvs = _context_kvs_from_embeddings(m, xc)
      return m.logits(m.window_pass(kvs, xw))[0] @ proj

    def ctx_out(xw):  # every context logit, in the dense sequence, w.r.t. the window inputs
      return m.logits(_dense_window_hidden(m, xc, xw)[0]).sum()

    jac = lambda f: jax.jacrev(f, argnums=(0, 1))(xc, xw)
    return jac(out_fast), jax.grad(ctx_out)(xw)

  j_fast, g_ctx = jacobians(params)
  assert (g_ctx == 0).all(), "context stream sees window tokens (dense reference mask)"
  for name, (jc, jw) in (("efficient", j_fast),):
    # jc (N, k, 1, N, D): d out[t, i] / d context embedding; jw (N, k, 1, N, k, D).
    per_ctx = jnp.abs(jc[:, :, 0]).sum(-1)  # (N, k, N)
    per_win = jnp.abs(jw[:, :, 0]).sum(-1)  # (N, k, N, k)
    for t in range(n):
      for i in range(k):
        where = f"{name}: noise ({t}, {i})"
        pc, pw = per_ctx[t, i], per_win[t, i]
        assert (pc[t + 1:] == 0).all(), f"{where} sees context after t"
        assert (pc[:t + 1] > 0).all(), f"{where} ignores context <= t"
        assert (pw.at[t].set(0.0) == 0).all(), f"{where} sees another window"
        assert (pw[t, i + 1:] == 0).all(), f"{where} sees later noise of its window"
        assert (pw[t, :i + 1] > 0).all(), f"{where} ignores earlier noise / itself"


# ---- context stream == the AR model ----


def test_context_logits_equal_ar_forward_with_backbone_params():
  graphdef, params = _pflm(seed=3)
  ar_graphdef, _ = _ar()
  backbone = {key: v for key, v in params.items() if key != "noise_encoder"}
  tokens = _tokens(41, 3, 11)
  pflm_logits = _jit(graphdef, lambda m, t: m(t))(params, tokens)
  ar_logits = _jit(ar_graphdef, lambda m, t: m(t))(backbone, tokens)
  np.testing.assert_array_equal(pflm_logits, ar_logits)
  # Window token (t, 0) sees the context <= t plus its z, so its logits differ from the context
  # logits at t: the two streams are really distinct (no tautology above).
  nl = _jit(graphdef, lambda m, t, z: m.noise_logits(t, z))(params, tokens,
                                                            jnp.full((3, 11, 1), 0.3))
  assert float(jnp.abs(nl[:, :, 0] - pflm_logits).max()) > 1e-3


# ---- noise encoder ----


def _ref_features(s, d, max_freq=1.0):
  s = np.asarray(s, np.float64)
  f = max_freq * 10000.0 ** (-np.arange(d // 2, dtype=np.float64) / (d // 2))
  ang = 2 * np.pi * np.float64(s)[..., None] * f
  return np.concatenate([np.cos(ang), np.sin(ang)], axis=-1)


@pytest.mark.parametrize("d,max_freq", [(32, 1.0), (768, 1.0), (256, 1000.0)])
def test_sinusoidal_features_match_float64(d, max_freq):
  rng = np.random.RandomState(0)
  s = np.concatenate([
      rng.uniform(0, 1, 2000), [0.0, 1e-8, 1e-7, 1e-6, 1e-3, 0.25, 0.5, 0.75, 1.0],
      1 - np.array([1e-3, 1e-5, 1e-6, 1e-7, 6e-8]), rng.uniform(0.999, 1.0, 200),
      rng.uniform(0, 1e-3, 200)]).astype(np.float32)
  got = np.asarray(jax.jit(sinusoidal_features, static_argnums=(1, 2))(jnp.asarray(s), d,
                                                                        max_freq))
  ref = _ref_features(s, d, max_freq)  # of the float32 s actually passed
  assert got.shape == (len(s), d) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_small_z_changes_are_not_swallowed():
  d = 64
  feat = jax.jit(sinusoidal_features, static_argnums=1)
  for z0 in (0.1, 0.5, 0.9, 0.999):
    for dz in (1e-6, 1e-7):
      z = np.array([z0, z0 + dz], np.float32)
      real_dz = float(np.float64(z[1]) - np.float64(z[0]))
      f = np.asarray(feat(jnp.asarray(z), d), np.float64)
      delta = f[1] - f[0]
      assert np.abs(delta).max() > 0, (z0, dz)
      ref = _ref_features(z, d)
      ref_delta = ref[1] - ref[0]  # max |.| ~ 2 pi dz
      if dz >= 1e-6:  # the change itself is right to a few % (float32 features err ~4e-7)
        assert np.abs(delta - ref_delta).max() < 0.15 * 2 * np.pi * real_dz, (z0, delta[:4])
  # ... and through the whole encoder.
  graphdef, params = _pflm()
  h = _jit(graphdef, lambda m, z: m.noise_encoder(z))(
      params, jnp.asarray([[0.4], [0.4 + 1e-6]], jnp.float32))
  assert h.shape == (2, 1, CFG.d_model) and h.dtype == jnp.float32
  assert float(jnp.abs(h[0] - h[1]).max()) > 0


def test_noise_encoder_shapes_and_tau():
  graphdef, params = _pflm()
  enc = _jit(graphdef, lambda m, z, tau: m.noise_encoder(z, tau))
  z = jax.random.uniform(jax.random.key(0), (2, 5, 3))
  assert sinusoidal_features(z, CFG.d_model).shape == (2, 5, 3, CFG.d_model)
  h1 = enc(params, z, 1.0)
  assert h1.shape == (2, 5, 3, CFG.d_model)
  # Per-token: the embedding of z[b, t, j] does not depend on the other z.
  np.testing.assert_allclose(enc(params, z[:1, 2:3, 1:2], 1.0), h1[:1, 2:3, 1:2], atol=1e-6,
                             rtol=1e-6)
  assert float(jnp.abs(enc(params, z, 0.7) - h1).max()) > 1e-4  # tau enters the embedding


# ---- init_from ----


def test_init_from_ar_teacher_copies_backbone_and_keeps_fresh_noise_encoder():
  t_graphdef, t_params = _ar(seed=5)
  s_graphdef, s_fresh = _pflm(seed=6)
  s_fresh_copy = jax.tree.map(jnp.array, s_fresh)
  student = pflm_lib.init_from(t_params, s_fresh)
  assert set(student) == set(s_fresh)
  flat_t = dict(jax.tree_util.tree_flatten_with_path(t_params)[0])
  flat_s = dict(jax.tree_util.tree_flatten_with_path(student)[0])
  flat_fresh = dict(jax.tree_util.tree_flatten_with_path(s_fresh_copy)[0])
  assert set(flat_s) == set(flat_fresh)
  n_shared = 0
  for path, value in flat_s.items():
    if path[0].key == "noise_encoder":
      np.testing.assert_array_equal(value, flat_fresh[path])
    else:
      np.testing.assert_array_equal(value, flat_t[path], err_msg=str(path))
      n_shared += 1
  assert n_shared == len(flat_t)
  # Teacher and fresh student differ somewhere (different seeds), so the copy is not trivial.
  assert not np.array_equal(flat_t[path_of(flat_t, "vocab_embed")],
                            flat_fresh[path_of(flat_fresh, "vocab_embed")])
  tokens = _tokens(51, 2, 9)
  fwd = lambda m, t: (m(t), m.context_pass(t)[1])  # logits and the context stream's k/v
  teacher_logits, kvs_t = _jit(t_graphdef, fwd)(t_params, tokens)
  student_logits, kvs = _jit(s_graphdef, fwd)(student, tokens)
  np.testing.assert_array_equal(student_logits, teacher_logits)
  for a, b in zip(jax.tree.leaves(kvs), jax.tree.leaves(kvs_t)):
    np.testing.assert_array_equal(a, b)


def path_of(flat, name):
  return next(p for p in flat if p[0].key == name)


def test_init_from_pflm_teacher_copies_everything():
  t_graphdef, t_params = _pflm(seed=7)
  _, s_fresh = _pflm(seed=8)
  student = pflm_lib.init_from(t_params, s_fresh)
  for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(t_params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(student) == jax.tree.structure(s_fresh)


def test_init_from_a_teacher_of_another_depth_fails():
  _, t_params = _pflm(seed=11)
  _, s_fresh = _pflm(dataclasses.replace(CFG, n_layers=CFG.n_layers + 2), seed=12)
  with pytest.raises(ValueError, match="cannot start from a teacher"):
    pflm_lib.init_from(t_params, s_fresh)


# ---- cached decoding (spec section 5) ----


@pytest.mark.slow
def test_cached_decode_matches_window_pass():
  k, p_len, b = 2, 6, 2
  graphdef, params = _pflm(seed=9)
  prompt = _tokens(61, b, p_len)
  z = jax.random.uniform(jax.random.key(62), (3, b, k))

  @jax.jit
  def decode(params, prompt, z):
    m = model_lib.merge(graphdef, params)
    ck, cv = model_lib.init_cache(CFG, b, 32)
    # prefill: [prompt ; k noise]; the length advances past the prompt only.
    x = jnp.concatenate([m.embed(prompt), m.noise_encoder(z[0])], axis=1)
    h, ck, cv = m.forward_cached(x, ck, cv, 0, fresh=True)
    logits = [m.logits(h[:, p_len:])]
    ys = [logits[-1].argmax(-1).astype(jnp.int32)]
    lens = [p_len]
    for step in (1, 2):  # [k produced tokens ; k fresh noise], keep only the k real ones.
      x = jnp.concatenate([m.embed(ys[-1]), m.noise_encoder(z[step])], axis=1)
      h, ck, cv = m.forward_cached(x, ck, cv, lens[-1])
      logits.append(m.logits(h))  # (B, 2k, V): the produced tokens' and the noise's
      ys.append(logits[-1][:, k:].argmax(-1).astype(jnp.int32))
      lens.append(lens[-1] + k)
    return logits, ys, lens

  logits, ys, lens = decode(params, prompt, z)
  assert [int(x) for x in lens] == [p_len, p_len + k, p_len + 2 * k]

  @jax.jit
  def references(params, prompt, z, ys):
    m = model_lib.merge(graphdef, params)
    # Prefill noise logits == noise_logits of the window of t = p_len - 1.
    refs = [m.noise_logits(prompt, jnp.broadcast_to(z[0][:, None], (b, p_len, k)))[:, -1]]
    # A later step: the window of the last context position t holds [y ; noise] at
    # t+1..t+2k. Its produced tokens see the cache (context <= t) and earlier produced tokens;
    # its noise sees all of them and earlier noise: exactly window_pass with that window at t,
    # where the context is everything in the cache.
    for step in (1, 2):
      ctx = jnp.concatenate([prompt] + ys[:step - 1], axis=1)
      n = ctx.shape[1]
      window = jnp.concatenate([m.embed(ys[step - 1]), m.noise_encoder(z[step])], axis=1)
      x = jnp.broadcast_to(window[:, None], (b, n, 2 * k, CFG.d_model))
      _, kvs = m.context_pass(ctx)
      fast = m.logits(m.window_pass(kvs, x)[:, -1])
      # The produced tokens are real tokens: their logits are the AR logits of [ctx ; y].
      ar = m(jnp.concatenate([ctx, ys[step - 1]], axis=1))[:, n:]
      refs.append((fast, ar))
    return refs

  refs = references(params, prompt, z, ys)
  np.testing.assert_allclose(logits[0], refs[0], **TOL)
  for step in (1, 2):
    fast, ar = refs[step]
    np.testing.assert_allclose(logits[step], fast, **TOL)
    np.testing.assert_allclose(logits[step][:, :k], ar, **TOL)
  assert len(set(np.asarray(jnp.concatenate(ys, 1)).ravel().tolist())) > 1


def test_bfloat16_keeps_the_response_to_small_z_changes():
  """Mixed precision: with model.dtype='bfloat16' only matmul inputs are bf16; the residual
  stream, norms and noise embeddings stay float32, so a z change of 1e-3 (which moves
  inverse-CDF targets) still moves the logits the way the float32 model's move. With a bf16
  residual stream (the old behaviour) the response was mostly rounding noise (cosine ~0.35)."""
  import dataclasses
  cfg = dataclasses.replace(CFG, d_model=64)
  g32, params = _pflm(cfg)
  g16, _ = _pflm(dataclasses.replace(cfg, dtype="bfloat16"))
  toks = _tokens(0, 2, 8, cfg)
  z = jax.random.uniform(jax.random.key(1), (2, 8, 3))
  dz = 1e-3

  def response(graphdef):
    f = _jit(graphdef, lambda m, t, zz: m.noise_logits(t, zz))
    return np.asarray(f(params, toks, z + dz) - f(params, toks, z), np.float64)

  ref, got = response(g32), response(g16)
  assert np.abs(ref).max() > 1e-3
  cosine = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
  assert cosine > 0.85, cosine
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.6
  # The residual stream itself is float32 in the bf16 model.
  m16 = model_lib.merge(g16, params)
  assert m16.embed(toks).dtype == jnp.float32
