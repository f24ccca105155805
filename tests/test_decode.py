"""Decoding (spec section 5) against independent uncached paths: the AR loop vs a full-forward
rollout, every PFLM step's logits vs `PFLM.noise_logits` over the whole prefix, k' < k vs
truncated k-windows, a (4, 2) mesh vs one device, hand-made penalty / EOS cases, and the AR
inverse-CDF sampler's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kforcing_jax.serving import decode
from kforcing_jax.distill import sampling
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib

CFG = model_lib.ModelConfig(vocab_size=61, mask_id=60, d_model=32, n_layers=2, n_heads=2)
PROMPTS = [[5, 9, 2], [7, 1, 1, 4, 30, 22, 8], [11, 3, 17, 40, 2]]  # lengths 3, 7, 5 -> bucket 8
REF_LEN = 40  # fixed buffer of the uncached references (causal: right padding is never seen)


def _params(pflm: bool, seed: int = 0):
  cls = pflm_lib.PFLM if pflm else model_lib.Transformer
  with nnx.use_eager_sharding(False):
    graphdef, params = model_lib.split_params(cls(CFG, nnx.Rngs(seed)))
  # The head is zero-initialised (spec): give it values so tokens depend on the input.
  params["head"] = 0.5 * jax.random.normal(jax.random.key(seed + 100), params["head"].shape)
  params["head_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 101), (CFG.vocab_size,))
  return graphdef, params


def _engine(graphdef, params, trained_k, mesh=None):
  mesh = mesh or sharding.make_mesh(1, 1, jax.devices()[:1])
  cls = pflm_lib.PFLM if trained_k else model_lib.Transformer
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: cls(CFG, nnx.Rngs(0)))
  params = jax.device_put(params, sharding.param_shardings(abstract, mesh, fsdp=False))
  return decode.Engine(graphdef, params, CFG, trained_k, mesh)


def _padded(ids):
  out = np.zeros((1, REF_LEN), np.int32)
  out[0, :len(ids)] = ids
  return out


# ---- cached decode == uncached full forward ----


@pytest.mark.slow
@pytest.mark.parametrize("greedy", [True, False])
def test_ar_loop_equals_uncached_rollout_and_rows_are_batch_independent(greedy):
  graphdef, params = _params(pflm=False)
  engine = _engine(graphdef, params, trained_k=0)
  spec = decode.DecodeSpec(k=1, max_new_tokens=10, ar=True, tau=0.0 if greedy else 1.0)
  got = [c.tokens for c in engine.generate(PROMPTS, spec, seed=3)]
  keys = decode.row_keys(3, range(len(PROMPTS)))
  z = np.asarray(decode.uniforms(jnp.asarray(keys), 0, 10))
  last_logits = jax.jit(lambda p, x, t: model_lib.merge(graphdef, p)(x)[0, t])
  pick = jax.jit(sampling.inverse_cdf)
  for r, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for i in range(10):  # the full causal forward of the whole sequence, every token
      logits = last_logits(params, _padded(seq), len(seq) - 1)
      seq.append(int(jnp.argmax(logits)) if greedy else int(pick(logits, z[r, i])))
    assert got[r] == seq[len(prompt):], f"row {r}"
  # A prompt decoded alone (batch of 1, its own padding) equals it inside the padded batch.
  alone = engine.generate([PROMPTS[1]], spec, seed=3, row_ids=[1])[0].tokens
  assert alone == got[1]
  assert len({tuple(t) for t in got}) == len(got)


@pytest.mark.slow
def test_pflm_step_logits_equal_uncached_two_stream_forward():
  k, max_new = 3, 11  # 4 blocks; the last one is truncated to 2 tokens
  graphdef, params = _params(pflm=True, seed=1)
  engine = _engine(graphdef, params, trained_k=k)
  spec = decode.DecodeSpec(k=k, max_new_tokens=max_new)
  inputs = engine.device_inputs(PROMPTS, seed=5)
  merge = lambda p: model_lib.merge(graphdef, p)
  pre = jax.jit(lambda p, *a: decode.prefill(merge(p), spec, *a))
  step = jax.jit(lambda p, s: decode.decode_step(merge(p), spec, s))
  state, logits = pre(params, *inputs)
  step_logits = [logits]
  for _ in range(spec.n_blocks - 1):
    state, logits = step(params, state)
    step_logits.append(logits)
  tokens = np.asarray(state.tokens_BxT)
  assert int(state.cache_len) == 8 + (spec.n_blocks - 1) * k

  keys = jnp.asarray(decode.row_keys(5, range(len(PROMPTS))))
  ref_fn = jax.jit(lambda p, x, z, t: merge(p).noise_logits(
      x, jnp.broadcast_to(z[None, None], (1, REF_LEN, k)))[0, t])
  for r, prompt in enumerate(PROMPTS):
    for s in range(spec.n_blocks):
      ctx = list(prompt) + tokens[r, :s * k].tolist()  # everything real before this block
      z = decode.uniforms(keys[r:r + 1], s * k, k)[0]
      ref = ref_fn(params, _padded(ctx), z, len(ctx) - 1)
      np.testing.assert_allclose(step_logits[s][r], ref, atol=2e-5, rtol=2e-5,
                                 err_msg=f"row {r} block {s}")
      np.testing.assert_array_equal(tokens[r, s * k:(s + 1) * k], np.argmax(ref, -1))
  # The while-loop program and the streaming loop give the same tokens as the steps above.
  got = engine.generate(PROMPTS, spec, seed=5)
  for r in range(len(PROMPTS)):
    assert got[r].tokens == tokens[r, :max_new].tolist()
  streamed = np.concatenate(list(engine.stream(PROMPTS, spec, seed=5)), axis=1)
  np.testing.assert_array_equal(streamed, tokens[:len(PROMPTS)])


@pytest.mark.slow
def test_k_prime_decoding_equals_truncated_k_windows():
  """A PFLM(4) decoded with k'=2: each block = the first 2 outputs of a full 4-noise window
  (whatever the 2 extra uniforms), computed without a cache."""
  graphdef, params = _params(pflm=True, seed=2)
  engine = _engine(graphdef, params, trained_k=4)
  spec = decode.DecodeSpec(k=2, max_new_tokens=8)
  got = [c.tokens for c in engine.generate(PROMPTS, spec, seed=7)]
  keys = jnp.asarray(decode.row_keys(7, range(len(PROMPTS))))
  ref_fn = jax.jit(lambda p, x, z, t: jnp.argmax(model_lib.merge(graphdef, p).noise_logits(
      x, jnp.broadcast_to(z[None, None], (1, REF_LEN, 4)))[0, t], -1))
  extra = np.random.RandomState(0)
  for r, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for s in range(4):
      z = np.concatenate([np.asarray(decode.uniforms(keys[r:r + 1], 2 * s, 2)[0]),
                          extra.uniform(size=2).astype(np.float32)])
      seq += np.asarray(ref_fn(params, _padded(seq), z, len(seq) - 1))[:2].tolist()
    assert got[r] == seq[len(prompt):], f"row {r}"
  with pytest.raises(ValueError, match="exceeds the checkpoint's trained window k=4"):
    engine.generate(PROMPTS, decode.DecodeSpec(k=5, max_new_tokens=5))


def test_mesh_4x2_gives_the_same_tokens_as_one_device():
  prompts = PROMPTS + [[4, 4], [9], [3, 8, 13, 21]]  # 6 prompts: padded to 8 on data=4
  # The penalty's (B, V) counts and the cache (heads over 'model') are sharded too.
  spec = decode.DecodeSpec(k=2, max_new_tokens=9, frequency_penalty=0.5)
  graphdef, params = _params(pflm=True, seed=4)
  one = _engine(graphdef, params, 2)
  many = _engine(graphdef, params, 2, sharding.make_mesh(4, 2))
  assert many.padded_batch(len(prompts)) == 8
  a = [c.tokens for c in one.generate(prompts, spec, seed=1)]
  b = [c.tokens for c in many.generate(prompts, spec, seed=1)]
  assert a == b
  assert len({tuple(t) for t in a}) > 1


# ---- hand-made cases: constant logits (zero head weights, a chosen bias) ----


def _constant_logits_engine(bias_V, trained_k):
  graphdef, params = _params(pflm=bool(trained_k), seed=5)
  params["head"] = jnp.zeros_like(params["head"])
  params["head_bias"] = jnp.asarray(bias_V, jnp.float32)
  return _engine(graphdef, params, trained_k)


def _bias(values: dict[int, float]) -> np.ndarray:
  b = np.full((CFG.vocab_size,), -5.0, np.float32)
  for i, v in values.items():
    b[i] = v
  return b


def test_frequency_penalty_counts_token_by_token_inside_a_block():
  # Penalty 1: 10 (3.0) -> 11 (2.5) -> 12 (2.2) -> 10 (now 2.0) -> 11 (1.5) -> 12 (1.2)
  # -> 10 (1.0) -> 13 (0.9 beats 10's 0.0). Counts updated only per block would give 10,10,10,10.
  bias = _bias({10: 3.0, 11: 2.5, 12: 2.2, 13: 0.9})
  want = [10, 11, 12, 10, 11, 12, 10, 13]
  for trained_k, spec in ((4, decode.DecodeSpec(k=4, max_new_tokens=8, frequency_penalty=1.0)),
                          (0, decode.DecodeSpec(k=1, max_new_tokens=8, ar=True, tau=0.0,
                                                frequency_penalty=1.0))):
    engine = _constant_logits_engine(bias, trained_k)
    out = engine.generate(PROMPTS[:2], spec)
    assert [c.tokens for c in out] == [want, want], spec  # without penalty: 10 x 8


def test_eos_stops_a_row_mid_block_and_fills_the_rest():
  bias = _bias({10: 3.0, 11: 2.5, 12: 2.2, 13: 0.9})
  engine = _constant_logits_engine(bias, trained_k=4)
  spec = decode.DecodeSpec(k=4, max_new_tokens=12, frequency_penalty=1.0, eos_id=12, fill_id=59)
  out = engine.generate(PROMPTS[:1], spec)[0]
  assert out.tokens == [10, 11, 12] and out.finished
  # The streaming loop stops after the first block (every row done) and shows the fill.
  blocks = list(engine.stream(PROMPTS[:1], spec))
  assert len(blocks) == 1 and blocks[0].tolist() == [[10, 11, 12, 59]]


def test_eos_per_row_on_a_random_model():
  """Rows stop at their own first EOS; tokens before it are unchanged, after it fill."""
  graphdef, params = _params(pflm=True, seed=6)
  engine = _engine(graphdef, params, trained_k=3)
  spec = decode.DecodeSpec(k=3, max_new_tokens=12)
  free = [c.tokens for c in engine.generate(PROMPTS, spec, seed=2)]
  # Choose as EOS the token whose first occurrences differ most between rows.
  def first(row, tok):
    return row.index(tok) if tok in row else None
  eos = max(set(sum(free, [])), key=lambda t: len({first(r, t) for r in free}))
  stops = [first(r, eos) for r in free]
  assert len(set(stops)) > 1, (free, eos)
  with_eos = engine.generate(PROMPTS, spec.__class__(k=3, max_new_tokens=12, eos_id=eos,
                                                     fill_id=CFG.mask_id), seed=2)
  for row, stop, c in zip(free, stops, with_eos):
    if stop is None:
      assert c.tokens == row and not c.finished
    else:
      assert c.tokens == row[:stop + 1] and c.finished
  # The raw buffer holds fill after EOS.
  inputs = engine.device_inputs(PROMPTS, seed=2)
  spec_eos = decode.DecodeSpec(k=3, max_new_tokens=12, eos_id=eos, fill_id=CFG.mask_id)
  toks, lengths = jax.device_get(engine.generate_arrays(spec_eos, *inputs))
  for r, stop in enumerate(stops):
    if stop is not None:
      assert lengths[r] == stop + 1 and (toks[r, stop + 1:] == CFG.mask_id).all()


def test_ar_inverse_cdf_sampler_distribution_and_uniform_stream():
  p = np.array([0.3, 0.05, 0.2, 0.15, 0.1, 0.12, 0.08], np.float64)
  ids = np.array([3, 4, 7, 8, 20, 33, 50])
  bias = np.full((CFG.vocab_size,), -60.0, np.float32)
  bias[ids] = np.log(p)
  engine = _constant_logits_engine(bias, trained_k=0)
  n_rows, n_tok = 256, 16
  spec = decode.DecodeSpec(k=1, max_new_tokens=n_tok, ar=True)
  prompts = [[1 + r % 50, 2] for r in range(n_rows)]
  samples = np.array([c.tokens for c in engine.generate(prompts, spec, seed=11)])
  # Exactly the inverse CDF of these logits at each token's uniform (float64 reference).
  z = np.asarray(decode.uniforms(jnp.asarray(decode.row_keys(11, range(n_rows))), 0, n_tok),
                 np.float64)
  cdf = np.cumsum(p)
  want = ids[np.minimum(np.searchsorted(cdf / cdf[-1], z, side="left"), len(ids) - 1)]
  np.testing.assert_array_equal(samples, want)
  # And distributed as p: chi-square over 4096 samples (df = 6; 22.5 is the 0.001 quantile).
  counts = np.array([(samples == i).sum() for i in ids])
  expected = p * samples.size
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 22.5, (chi2, counts, expected)
  assert np.isin(samples, ids).all()
