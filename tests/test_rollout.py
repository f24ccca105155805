"""Teacher rollouts and distillation targets (spec section 4): the scan rollouts against
independent round-by-round / token-by-token computations, target reproducibility across batch
composition and sharding, and the noise-inversion baseline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kforcing_jax.distill import targets as distill, rollout, sampling
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib

CFG = model_lib.ModelConfig(vocab_size=61, mask_id=60, d_model=32, n_layers=2, n_heads=2)


def _randomise(params, seed):
  """Every weight matrix redrawn at unit-variance-preserving scale (std 1/sqrt(fan_in); the
  embeddings std 1; the zero-initialised head 2/sqrt(d)), so that hidden states, argmaxes and
  samples vary a lot with the inputs (a fresh init at std 0.02 argmaxes to one or two ids)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, x) in enumerate(flat):
    name = path[-1].key
    key = jax.random.key(1000 * seed + i)
    if name == "vocab_embed":
      std = 1.0
    elif name == "head":
      std = 2.0 / x.shape[0] ** 0.5
    elif name == "attn_qkv":
      std = 1.0 / x.shape[0] ** 0.5
    elif x.ndim >= 2:
      std = 1.0 / (x.size // x.shape[-1]) ** 0.5
    else:
      out.append(x)
      continue
    out.append(std * jax.random.normal(key, x.shape, x.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _pflm(seed=0):
  with nnx.use_eager_sharding(False):
    m = pflm_lib.PFLM(CFG, nnx.Rngs(seed))
  graphdef, params = model_lib.split_params(m)
  return graphdef, _randomise(params, seed)


def _ar(seed=0):
  with nnx.use_eager_sharding(False):
    m = model_lib.Transformer(CFG, nnx.Rngs(seed))
  graphdef, params = model_lib.split_params(m)
  return graphdef, _randomise(params, seed)


def _tokens(key, b, n):
  return jax.random.randint(jax.random.key(key), (b, n), 0, CFG.mask_id, jnp.int32)


# ---- PFLM rollout (scan over rounds) == round-by-round by hand ----


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_pflm_rollout_equals_hand_rounds(k):
  """R = 2 and R = 4 rounds of a PFLM(k) teacher. Rollouts are prefix-consistent (round r
  only depends on z of rounds <= r), so the hand-made R = 4 rollout also checks R = 2."""
  b, n, rounds = 2, 6, 4
  graphdef, params = _pflm(seed=k)
  tokens = _tokens(10 * k, b, n)
  z = jax.random.uniform(jax.random.key(k), (b, n, rounds * k))

  @jax.jit
  def scanned(params, tokens, z):
    return rollout.pflm_rollout(model_lib.merge(graphdef, params), tokens, z, k)

  @jax.jit
  def by_hand(params, tokens, z):
    m = model_lib.merge(graphdef, params)
    _, kvs = m.context_pass(tokens)
    outs = []
    for feed_back in (True, False):  # False: a wrong rollout, to show the test has power
      produced = jnp.zeros((b, n, 0), jnp.int32)
      for r in range(rounds):  # exact-length windows: no valid mask, no scan
        prev = produced if feed_back else jnp.zeros_like(produced)
        x = jnp.concatenate([m.embed(prev), m.noise_encoder(z[..., r * k:(r + 1) * k])], 2)
        assert x.shape == (b, n, (r + 1) * k, CFG.d_model)
        h = m.window_pass(kvs, x)
        y = m.logits(h[:, :, -k:]).argmax(-1).astype(jnp.int32)
        produced = jnp.concatenate([produced, y], axis=2)
      outs.append(produced)
    return outs

  want, wrong = by_hand(params, tokens, z)
  for r in (2, 4):
    got = scanned(params, tokens, z[..., :r * k])
    assert got.shape == (b, n, r * k) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want[..., :r * k], err_msg=f"R={r}")
  assert len(np.unique(np.asarray(got))) > 3, np.asarray(got)
  # The comparison has power: the outputs depend on z and on feeding produced tokens back.
  assert (scanned(params, tokens, 1.0 - z) != got).any()
  assert (wrong[..., k:] != got[..., k:]).any()


# ---- AR rollout == sequential inverse-CDF sampling with the plain causal forward ----


@pytest.mark.slow
def test_ar_rollout_equals_sequential_inverse_cdf():
  b, n, max_rounds = 2, 6, 4
  graphdef, params = _ar(seed=3)
  tokens = _tokens(20, b, n)
  toks = np.asarray(tokens)
  # Every (b, t) as its own row [x_0..x_t, y_0..y_(j-1), padding]; the causal forward's logits
  # at the row's last real position (padding comes after it, so causality makes it inert).
  length = n + max_rounds - 1

  @jax.jit
  def next_token(params, seqs, last, z):
    logits = model_lib.merge(graphdef, params)(seqs)[jnp.arange(seqs.shape[0]), last]
    return sampling.inverse_cdf(logits, z), logits

  for rounds in (1, max_rounds):
    z = jax.random.uniform(jax.random.key(21 + rounds), (b, n, rounds))
    got = np.asarray(jax.jit(lambda p, t, z: rollout.ar_rollout(
        model_lib.merge(graphdef, p), t, z))(params, tokens, z))
    assert got.shape == (b, n, rounds)
    # with_logits (the z-blind floors): the same tokens, and the logits each was drawn from.
    got2, got_logits = jax.jit(lambda p, t, z: rollout.ar_rollout(
        model_lib.merge(graphdef, p), t, z, with_logits=True))(params, tokens, z)
    np.testing.assert_array_equal(np.asarray(got2), got)
    assert got_logits.shape == (b, n, rounds, CFG.vocab_size)
    zz = np.asarray(z)
    rows = [(bi, t) for bi in range(b) for t in range(n)]
    produced = np.zeros((len(rows), rounds), np.int32)
    want_logits = np.zeros((len(rows), rounds, CFG.vocab_size), np.float32)
    for j in range(rounds):
      seqs = np.zeros((len(rows), length), np.int32)
      for r, (bi, t) in enumerate(rows):
        seqs[r, :t + 1 + j] = np.concatenate([toks[bi, :t + 1], produced[r, :j]])
      last = np.array([t + j for _, t in rows])
      y, lg = next_token(params, seqs, last, np.array([zz[bi, t, j] for bi, t in rows]))
      produced[:, j], want_logits[:, j] = y, lg
    want = produced.reshape(b, n, rounds)
    np.testing.assert_array_equal(got, want, err_msg=f"R={rounds}")
    np.testing.assert_allclose(np.asarray(got_logits).reshape(len(rows), rounds, -1),
                               want_logits, atol=2e-4, rtol=1e-4)
    assert len(np.unique(got)) > 3


@pytest.mark.slow
def test_ar_rollout_continues_a_given_prefix_where_mixed():
  """distill.own_prefix: where mix, round j continues the given tokens (the student's argmax),
  checked against the plain causal forward on [x_0..x_t, prefix_0..prefix_(j-1)]; elsewhere,
  and everywhere when the prefix is the rollout's own samples, the plain rollout."""
  b, n, rounds = 2, 6, 3
  graphdef, params = _ar(seed=6)
  tokens = _tokens(40, b, n)
  z = jax.random.uniform(jax.random.key(41), (b, n, rounds))
  given = _tokens(42, b * n * rounds, 1).reshape(b, n, rounds)
  mix = jax.random.uniform(jax.random.key(43), (b, n)) < 0.5
  run = jax.jit(lambda p, t, z, g, m: rollout.ar_rollout(model_lib.merge(graphdef, p), t, z,
                                                         prefix_BxNxR=g, mix_BxN=m))
  plain = np.asarray(jax.jit(lambda p, t, z: rollout.ar_rollout(
      model_lib.merge(graphdef, p), t, z))(params, tokens, z))
  everywhere = jnp.ones((b, n), bool)
  np.testing.assert_array_equal(np.asarray(run(params, tokens, z, plain, everywhere)), plain)
  got = np.asarray(run(params, tokens, z, given, mix))
  toks, gv, zz, mm = map(np.asarray, (tokens, given, z, mix))
  model = jax.jit(lambda p, x: model_lib.merge(graphdef, p)(x))
  for bi in range(b):
    for t in range(n):
      prefix = gv[bi, t] if mm[bi, t] else plain[bi, t]
      for j in range(rounds):
        seq = np.concatenate([toks[bi, :t + 1], prefix[:j]])[None]
        want = sampling.inverse_cdf(model(params, seq)[:, -1], zz[bi, t, j][None])
        assert got[bi, t, j] == int(want[0]), (bi, t, j)
  assert mm.any() and (~mm).any()
  assert (got[mm][:, 1:] != plain[mm][:, 1:]).any()
  np.testing.assert_array_equal(got[~mm], plain[~mm])
  np.testing.assert_array_equal(got[..., 0], plain[..., 0])


def test_own_prefix_applies_only_to_the_ar_teachers_rollout():
  ar, _ = distill.stage_spec("k4", "teacher", "self_forcing", own_prefix=0.5)
  chain, _ = distill.stage_spec("k4", "k2", "self_forcing", own_prefix=0.5)
  rolled, _ = distill.stage_spec("k4", "k2", "ar_rollout", own_prefix=0.5)
  inverted, _ = distill.stage_spec("k4", "teacher", "noise_inversion", own_prefix=0.5)
  assert (ar.own_prefix, chain.own_prefix, rolled.own_prefix, inverted.own_prefix) == (
      0.5, 0.0, 0.5, 0.0)


# ---- target reproducibility: batch composition, jit and sharding ----


def _all_targets(ar, pf, tokens, z4, u):
  """make_targets for every stage kind at once (one compile per input layout)."""
  specs = {
      "ar_r2": (distill.StageSpec(student_k=2, teacher_k=0), ar, z4[..., :2]),
      "ar_r1": (distill.StageSpec(student_k=1, teacher_k=0), ar, z4[..., :1]),
      "pflm_k2_r2": (distill.StageSpec(student_k=4, teacher_k=2), pf, z4),
      "noise_inv": (distill.StageSpec(student_k=3, teacher_k=0, target="noise_inversion"), ar,
                    z4[..., :3]),
  }
  return {name: distill.make_targets(spec, teacher, tokens, z, u[..., :z.shape[-1]])[:3]
          for name, (spec, teacher, z) in specs.items()}


@pytest.mark.slow
def test_targets_reproducible_across_batch_jit_and_sharding():
  n = 8
  ar_graphdef, ar_params = _ar(seed=4)
  pf_graphdef, pf_params = _pflm(seed=5)
  k1, k2, k3 = jax.random.split(jax.random.key(30), 3)
  row = _tokens(31, 1, n)
  z_row = jax.random.uniform(k1, (1, n, 4))
  u_row = jax.random.uniform(k2, (1, n, 4))

  def fn(ar_p, pf_p, tokens, z, u):
    return _all_targets(model_lib.merge(ar_graphdef, ar_p), model_lib.merge(pf_graphdef, pf_p),
                        tokens, z, u)

  def in_batch(size, pos=3):
    ko = jax.random.fold_in(k3, size)
    others = jax.random.randint(ko, (size, n), 0, CFG.mask_id, jnp.int32)
    zo = jax.random.uniform(jax.random.fold_in(ko, 1), (size, n, 4))
    uo = jax.random.uniform(jax.random.fold_in(ko, 2), (size, n, 4))
    return others.at[pos].set(row[0]), zo.at[pos].set(z_row[0]), uo.at[pos].set(u_row[0])

  alone = jax.jit(fn)(ar_params, pf_params, row, z_row, u_row)
  results = {"batch of 6, row 3": jax.jit(fn)(ar_params, pf_params, *in_batch(6))}
  # Tensor parallel over 'model' and FSDP over 'data' (the (8, 1) mesh is pure data
  # parallelism, a subset of this; left out to keep the test fast).
  for data, model, fsdp in ((4, 2, True),):
    mesh = sharding.make_mesh(data, model)
    batch_sh = NamedSharding(mesh, P("data"))
    ar_sh = sharding.param_shardings(model_lib.abstract_model(CFG), mesh, fsdp)
    pf_sh = sharding.param_shardings(pflm_lib.abstract_pflm(CFG), mesh, fsdp)
    args = (jax.device_put(ar_params, ar_sh), jax.device_put(pf_params, pf_sh),
            *jax.device_put(in_batch(8), batch_sh))
    assert len(args[2].sharding.device_set) == 8
    results[f"mesh ({data}, {model}), fsdp={fsdp}, row 3 of 8"] = jax.jit(fn)(*args)

  for name, (targets, weights, z) in alone.items():
    t = np.asarray(targets[0])
    assert len(np.unique(t)) > 2, (name, t)  # non-degenerate
    for where, res in results.items():
      t2, w2, z2 = (np.asarray(a[3]) for a in res[name])
      np.testing.assert_array_equal(t2, t, err_msg=f"{name}: targets, {where}")
      np.testing.assert_array_equal(w2, np.asarray(weights[0]), err_msg=f"{name}, {where}")
      # The z the student sees: the input z itself, or for noise inversion a z inside the
      # target's CDF bin computed from the teacher's logits. That z moves by float rounding
      # (~1e-7) when XLA compiles the teacher differently: reductions split over devices
      # (tensor parallelism), or a batch of ONE row, whose fused exp rounds ~3% of values the
      # other way on XLA:CPU (see test_sampling). Its target (the real token) does not move.
      if name == "noise_inv":
        np.testing.assert_allclose(z2, np.asarray(z[0]), atol=2e-6, rtol=0,
                                   err_msg=f"{name}: z, {where}")
      else:
        np.testing.assert_array_equal(z2, np.asarray(z[0]), err_msg=f"{name}: z, {where}")


# ---- noise inversion ----


def test_invert_noise_round_trips_through_inverse_cdf():
  rows, v = 8, 2000
  logits = 3.0 * jax.random.normal(jax.random.key(40), (rows, v))
  probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float64) if jax.config.x64_enabled
                                    else logits))
  # Every id with p > 1e-4 (of each row) at u = 0, 1/2, 1 and random.
  pairs = np.argwhere(probs > 1e-4)
  assert len(pairs) > 200
  r, ids = pairs[:, 0], pairs[:, 1].astype(np.int32)
  us = [np.zeros(len(ids)), np.full(len(ids), 0.5), np.ones(len(ids)),
        np.asarray(jax.random.uniform(jax.random.key(41), (len(ids),)))]

  @jax.jit
  def round_trip(logits_r, ids, u):
    z = sampling.invert_noise(logits_r, ids, u)
    return z, sampling.inverse_cdf(logits_r, z)

  logits_r = jnp.asarray(logits)[r]
  for u in us:
    z, back = round_trip(logits_r, jnp.asarray(ids), jnp.asarray(u, jnp.float32))
    z, back = np.asarray(z), np.asarray(back)
    assert ((z >= 0) & (z < 1)).all()
    bad = np.flatnonzero(back != ids)
    assert len(bad) == 0, (f"{len(bad)} of {len(ids)} ids not recovered, e.g. id {ids[bad[:3]]}"
                           f" p={probs[r[bad[:3]], ids[bad[:3]]]} z={z[bad[:3]]}")


def test_noise_inversion_targets_are_next_tokens():
  b, n, k = 3, 7, 3
  graphdef, params = _ar(seed=6)
  tokens = _tokens(50, b, n)
  u = jax.random.uniform(jax.random.key(51), (b, n, k))
  spec = distill.StageSpec(student_k=k, teacher_k=0, target="noise_inversion")

  @jax.jit
  def run(params, tokens, u):
    teacher = model_lib.merge(graphdef, params)
    return distill.make_targets(spec, teacher, tokens, jnp.zeros_like(u), u), teacher(tokens)

  (targets, weights, z, soft), logits = run(params, tokens, u)
  assert soft is None
  targets, weights, z = np.asarray(targets), np.asarray(weights), np.asarray(z)
  toks, logits = np.asarray(tokens), np.asarray(logits)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  t_idx, j_idx = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
  valid = t_idx + 1 + j_idx < n  # (N, k): x_(t+1+j) exists
  for t in range(n):
    for j in range(k):
      if valid[t, j]:  # the real next token x_(t+1+j), predicted from the state at t+j
        np.testing.assert_array_equal(targets[:, t, j], toks[:, t + 1 + j])
        np.testing.assert_array_equal(weights[:, t, j], 1.0)
      else:  # past the sequence end: no target
        np.testing.assert_array_equal(weights[:, t, j], 0.0)
  # z lies in the target's CDF bin under q(. | x_<=t+j): sampling the teacher there gives it.
  state = np.minimum(t_idx + j_idx, n - 1)
  back = np.asarray(jax.jit(sampling.inverse_cdf)(jnp.asarray(logits[:, state]), jnp.asarray(z)))
  p_target = np.take_along_axis(probs[:, state], targets[..., None], -1)[..., 0]
  live = valid[None] & (p_target > 1e-4)
  assert live.sum() > 20
  np.testing.assert_array_equal(back[live], targets[live])
  assert ((z >= 0) & (z < 1)).all()


@pytest.mark.slow
def test_loss_is_the_mean_of_the_per_offset_nlls():
  """With full windows the loss weighs every offset alike: the mean of NLL_1..NLL_k."""
  b, n, k = 2, 6, 4
  graphdef, params = _pflm(seed=7)
  student = model_lib.merge(graphdef, params)
  tokens = _tokens(60, b, n)
  z = jax.random.uniform(jax.random.key(61), (b, n, k))
  targets = _tokens(62, b * k, n).reshape(b, k, n).transpose(0, 2, 1)
  flat, aux = distill.student_loss(student, tokens, z, targets, jnp.ones((b, n, k)))
  nll_j = np.array([aux[f"nll_{j}"] for j in range(1, k + 1)])
  assert np.ptp(nll_j) > 0.05  # offsets differ
  np.testing.assert_allclose(flat, nll_j.mean(), rtol=1e-5)


# ---- reference points of NLL_j from the teacher alone (serving/scorer.offset_floors) ----


@pytest.mark.slow
def test_offset_floors_bracket_the_no_noise_student():
  from kforcing_jax.serving import scorer

  tokens = np.asarray(_tokens(40, 8, 16))
  # A teacher whose logits ignore the input (head weights 0): every offset's marginal and
  # every conditional is softmax(bias), so all three reference points are its entropy.
  graphdef, params = _ar(seed=7)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if jax.tree_util.keystr(path) == "['head']" else x,
      params)
  logits = np.asarray(model_lib.merge(graphdef, params)(jnp.asarray(tokens[:1, :2])))[0, 0]
  p = np.exp(logits - logits.max())
  p /= p.sum()
  entropy = float(-(p * np.log(np.maximum(p, 1e-30))).sum())
  f = scorer.Scorer().offset_floors(graphdef, params, tokens, k=3, samples=4)
  for j in (1, 2, 3):
    np.testing.assert_allclose([f[f"blind_lo_{j}"], f[f"prefix_{j}"]], entropy, rtol=1e-5)
    assert abs(f[f"blind_{j}"] - entropy) < 0.5  # a sample mean over 128 positions
  # A teacher that uses its context: conditioning lowers entropy, so the prefix-known point
  # sits below the blind one from offset 2 on; one rollout makes the two coincide; and the
  # held-out estimate over-estimates the blind floor when few rollouts average the marginal.
  graphdef, params = _ar(seed=3)
  f = scorer.Scorer().offset_floors(graphdef, params, tokens, k=3, samples=4)
  np.testing.assert_allclose(f["blind_lo_1"], f["prefix_1"], rtol=1e-5)
  for j in (2, 3):
    assert f[f"prefix_{j}"] < f[f"blind_lo_{j}"] - 0.05 < f[f"blind_{j}"]
  one = scorer.Scorer().offset_floors(graphdef, params, tokens, k=3, samples=1)
  for j in (1, 2, 3):
    np.testing.assert_allclose(one[f"blind_lo_{j}"], one[f"prefix_{j}"], rtol=1e-5)


@pytest.mark.slow
def test_offset_metrics_and_floors_in_row_chunks_match_one_batch(monkeypatch):
  """serving/scorer computes both in fixed-size row chunks (bounded memory): 5 rows in
  chunks of 2 (the last padded) must give what one batch of 5 gives, row by row."""
  from kforcing_jax.serving import scorer

  tokens = np.asarray(_tokens(70, 5, 8))
  ar_def, ar_params = _ar(seed=3)
  pf_def, pf_params = _pflm(seed=4)
  sc = scorer.Scorer()  # one scorer: its compiled functions serve both chunkings
  run = lambda: (sc.offset_metrics(pf_def, pf_params, ar_def, ar_params, tokens, 3, seed=1),
                 sc.offset_floors(ar_def, ar_params, tokens, k=3, samples=3, seed=1))
  monkeypatch.setattr(scorer, "ROW_CHUNK", 64)
  whole, whole_floors = run()
  monkeypatch.setattr(scorer, "ROW_CHUNK", 2)
  chunked, chunked_floors = run()
  assert np.asarray(whole["row_nll"]).shape == (5, 3)
  np.testing.assert_allclose(chunked["row_nll"], whole["row_nll"], rtol=1e-5)
  assert np.ptp(np.asarray(whole["row_nll"])[:, 0]) > 1e-3  # rows differ: order matters
  # Every other field, miss_anatomy's included (None: an empty bucket, compared as NaN).
  nan = lambda v: np.asarray([np.nan if x is None else x for x in np.atleast_1d(v)], float)
  for name in whole:
    if name != "row_nll":
      np.testing.assert_allclose(nan(chunked[name]), nan(whole[name]), rtol=1e-5, err_msg=name)
  assert {"q_share_3", "acc_q_3", "acc_after_hits_3", "argmax_entropy_3"} <= set(whole)
  for name in whole_floors:
    np.testing.assert_allclose(chunked_floors[name], whole_floors[name], rtol=1e-5, err_msg=name)


# ---- soft targets: the AR teacher's inverse-CDF blurred over z (distill.cdf_blur) ----


def _dense(ids_xW, w_xW, v):
  """Scatter (window ids, weights) to a dense (..., V) distribution."""
  ids, w = np.asarray(ids_xW), np.asarray(w_xW)
  out = np.zeros(ids.shape[:-1] + (v,))
  np.add.at(out.reshape(-1, v), (np.arange(out.size // v)[:, None], ids.reshape(-1, ids.shape[-1])),
            w.reshape(-1, w.shape[-1]))
  return out


@pytest.mark.slow
def test_blurred_targets_match_a_monte_carlo_over_z_and_reach_both_limits():
  """blurred_window(q, z, ids, s, r) is the law of inverse_cdf(q, z') for z' ~ U[z - s, z + s]
  clipped to [0, 1]: checked against 20000 such draws through the exact sampler (r covering the
  whole vocabulary); s -> 0 gives the one-hot target, the whole interval gives q itself; a small
  r keeps the law on the r ids either side of the target, renormalised."""
  v = 40
  logits = jax.random.normal(jax.random.key(70), (3, v)) * 2.0
  z = jnp.array([0.004, 0.5, 0.97])
  ids = sampling.inverse_cdf(logits, z)
  sigma = 0.05
  win, w = sampling.blurred_window(logits, z, ids, sigma, radius=v)
  soft = _dense(win, w, v)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
  m = 20000
  lo, hi = jnp.clip(z - sigma, 0, 1), jnp.clip(z + sigma, 0, 1)
  zs = lo + (hi - lo) * jax.random.uniform(jax.random.key(71), (m, 3))
  draws = np.asarray(jax.jit(sampling.inverse_cdf)(jnp.broadcast_to(logits, (m, 3, v)), zs))
  freq = np.stack([np.bincount(draws[:, r], minlength=v) / m for r in range(3)])
  assert (soft > 0).sum(-1).min() >= 2  # a real spread, not the one-hot
  np.testing.assert_allclose(soft, freq, atol=0.015)
  tiny = _dense(*sampling.blurred_window(logits, z, ids, 1e-6, radius=v), v)
  np.testing.assert_array_equal(tiny.argmax(-1), np.asarray(ids))
  assert tiny.max(-1).min() > 0.999
  whole = _dense(*sampling.blurred_window(logits, z, ids, 0.9999, radius=v), v)
  np.testing.assert_allclose(whole, jax.nn.softmax(logits), atol=1e-5)
  r = 2
  win2, w2 = sampling.blurred_window(logits, z, ids, sigma, radius=r)
  near = np.abs(np.arange(v)[None] - np.asarray(ids)[:, None]) <= r
  cut = np.where(near, soft, 0.0)
  np.testing.assert_allclose(_dense(win2, w2, v), cut / cut.sum(-1, keepdims=True), atol=1e-5)


def test_cdf_blur_applies_only_where_the_ar_teacher_makes_the_targets():
  blur = lambda stage, prev, target: distill.stage_spec(stage, prev, target,
                                                        cdf_blur=0.01)[0].cdf_blur
  assert blur("k1", "teacher", "self_forcing") == 0.01  # the chain's first stage
  assert blur("k4", "teacher", "self_forcing") == 0.01  # single-stage AR -> k4
  assert blur("k2", "k1", "self_forcing") == 0.0  # k1's argmax rollout: no CDF
  assert blur("k4", "k2", "ar_rollout") == 0.01
  assert blur("k4", "teacher", "noise_inversion") == 0.0


@pytest.mark.slow
def test_soft_targets_train_the_loss_but_metrics_stay_against_the_one_hot_targets():
  """distill.cdf_blur: make_targets returns the blurred AR rollout; student_loss averages the
  cross-entropy against it (recomputed here from the student's logits), while NLL_j / acc_j are
  the same as without soft targets."""
  b, n, k = 2, 6, 3
  ar_graphdef, ar_params = _ar(seed=8)
  graphdef, params = _pflm(seed=9)
  student = model_lib.merge(graphdef, params)
  tokens = _tokens(80, b, n)
  z = jax.random.uniform(jax.random.key(81), (b, n, k))
  spec = distill.StageSpec(student_k=k, teacher_k=0, cdf_blur=0.05)
  teacher = model_lib.merge(ar_graphdef, ar_params)
  targets, weights, z_out, soft = distill.make_targets(spec, teacher, tokens, z, z)
  hard_targets = distill.make_targets(dataclasses.replace(spec, cdf_blur=0.0), teacher, tokens,
                                      z, z)
  np.testing.assert_array_equal(targets, hard_targets[0])
  assert hard_targets[3] is None
  # Made round by round inside the rollout's scan = made afterwards from every round's logits.
  _, logits = rollout.ar_rollout(teacher, tokens, z, with_logits=True)
  ids_ref, w_ref = sampling.blurred_window(logits, z, targets, 0.05, distill.BLUR_RADIUS)
  np.testing.assert_array_equal(soft[0], ids_ref)
  np.testing.assert_allclose(soft[1], w_ref, atol=1e-6)
  dense = _dense(*soft, CFG.vocab_size)
  assert dense.shape == (b, n, k, CFG.vocab_size)
  # z lies inside its own bin, so the one-hot target always keeps some of the mass.
  assert (np.take_along_axis(dense, np.asarray(targets)[..., None], -1) > 0).all()
  loss, aux = distill.student_loss(student, tokens, z, targets, weights, soft=soft)
  plain, aux_plain = distill.student_loss(student, tokens, z, targets, weights)
  logp = jax.nn.log_softmax(student.noise_logits(tokens, z).astype(jnp.float32), -1)
  np.testing.assert_allclose(loss, -(dense * np.asarray(logp)).sum(-1).mean(), rtol=1e-5)
  assert abs(float(loss) - float(plain)) > 1e-3
  for name in aux:
    np.testing.assert_allclose(aux[name], aux_plain[name], rtol=1e-6)
