"""Sampling controls (temperature, top-k, top-p, min-p) against a NumPy reference: the exact
transformed distribution (chi-square over many uniforms), greedy at temperature 0, per-row
settings equal to static ones, the AR decode against an uncached step-by-step reference, and
temperature-conditioned students: per-sequence temperatures in training, a trained range that
decoding enforces, and a student whose samples grow more diverse with the temperature."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from kforcing_jax.distill import rollout, sampling
from kforcing_jax.distill import targets as distill
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.serving import decode
from kforcing_jax.training import stage_io

from test_speculative import PROMPTS, _stage

# (temperature, top_k, top_p, min_p)
SETTINGS = [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.5, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0),
            (1.0, 0, 0.7, 0.0), (1.0, 0, 1.0, 0.15), (1.3, 5, 0.9, 0.02)]


def reference_probs(logits, temperature, top_k, top_p, min_p):
  """The transformed distribution in float64, written independently of sampling.py."""
  x = np.asarray(logits, np.float64) / temperature
  p = np.exp(x - x.max())
  p /= p.sum()
  keep = np.ones_like(p, bool)
  order = np.argsort(-x, kind="stable")
  if top_k > 0:
    keep &= x >= x[order[min(top_k, len(x)) - 1]]
  if top_p < 1:
    cum = np.cumsum(p[order])
    last = int(np.argmax(cum >= top_p - 1e-6))  # float32 cumsum tolerance
    keep &= x >= x[order[last]]
  if min_p > 0:
    keep &= p >= min_p * p.max()
  q = np.where(keep, p, 0.0)
  return q / q.sum()


def _chi2_ok(counts, probs, n):
  expected = probs * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    assert obs[-1] == 0, "a filtered-out id was sampled"
    obs, exp = obs[:-1], exp[:-1]
  chi2 = ((obs - exp) ** 2 / exp).sum()
  return chi2 < stats.chi2.ppf(0.999, max(len(obs) - 1, 1)), chi2


@pytest.mark.parametrize("setting", SETTINGS)
def test_samples_follow_the_transformed_distribution(setting):
  logits = jax.random.normal(jax.random.key(3), (40,)) * 1.5
  n = 20000
  z = jax.random.uniform(jax.random.key(4), (n,))
  ids = np.asarray(jax.jit(lambda l, z: sampling.sample(l, z, *setting))(
      jnp.broadcast_to(logits, (n, 40)), z))
  probs = reference_probs(logits, *setting)
  ok, chi2 = _chi2_ok(np.bincount(ids, minlength=40).astype(float), probs, n)
  assert ok, (setting, chi2)
  assert set(np.unique(ids)) <= set(np.flatnonzero(probs > 0))
  # The distribution `probabilities` reports (speculative sampling's p) is the same one.
  np.testing.assert_allclose(np.asarray(sampling.probabilities(logits, *setting)), probs,
                             atol=2e-6)


@pytest.mark.slow
def test_temperature_zero_is_the_argmax_and_rows_may_differ():
  logits = jax.random.normal(jax.random.key(5), (6, 30)) * 2
  z = jax.random.uniform(jax.random.key(6), (6,))
  assert (np.asarray(sampling.sample(logits, z, 0.0)) == np.argmax(logits, -1)).all()
  rows = [SETTINGS[i % len(SETTINGS)] for i in range(5)] + [(0.0, 0, 1.0, 0.0)]
  per_row = sampling.Controls.rows(6, *[jnp.asarray(c) for c in zip(*rows)])
  got = np.asarray(jax.jit(lambda l, z, c: c.sample(l, z))(logits, z, per_row))
  want = [int(sampling.sample(logits[r], z[r], *rows[r])) for r in range(6)]
  assert got.tolist() == want
  # One row asking for a filter does not filter the others.
  mixed = sampling.Controls.rows(6, top_p=jnp.asarray([0.5] + [1.0] * 5))
  np.testing.assert_array_equal(np.asarray(mixed.transformed(logits))[1:],
                                np.asarray(logits)[1:])


def test_bad_settings_are_refused_naming_them():
  for kw, name in [({"temperature": -0.1}, "temperature"), ({"top_k": -2}, "top_k"),
                   ({"top_p": 0.0}, "top_p"), ({"top_p": 1.2}, "top_p"),
                   ({"min_p": 1.5}, "min_p")]:
    with pytest.raises(ValueError, match=name):
      sampling.check_controls(**kw)
  with pytest.raises(ValueError, match="top_p is an AR option"):
    decode.DecodeSpec(k=2, max_new_tokens=4, top_p=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [(0.8, 5, 0.9, 0.0), (1.2, 0, 1.0, 0.1), (0.0, 0, 1.0, 0.0)])
def test_ar_decode_equals_an_uncached_reference_under_the_controls(setting):
  teacher = _stage("teacher", 0, seed=1, head_scale=1.0)
  spec = decode.DecodeSpec(k=1, max_new_tokens=9, ar=True, tau=setting[0], top_k=setting[1],
                           top_p=setting[2], min_p=setting[3])
  outs = decode.Engine.from_stage(teacher).generate(PROMPTS, spec, seed=3)
  t = teacher.model()
  forward = jax.jit(lambda x: t(x)[0, -1])
  for r, prompt in enumerate(PROMPTS):
    key = jnp.asarray(decode.row_keys(3, [r]))
    z = np.asarray(decode.uniforms(key, 0, 9))[0]
    seq = list(prompt)
    for i in range(9):
      logits = np.asarray(forward(jnp.asarray([seq])), np.float64)
      if setting[0] == 0:
        y = int(np.argmax(logits))
      else:
        cdf = np.cumsum(reference_probs(logits, *setting))
        y = int(min(np.searchsorted(cdf, z[i] * cdf[-1]), len(cdf) - 1))
      seq.append(y)
    assert outs[r].tokens == seq[len(prompt):], (r, setting)


@pytest.mark.slow
def test_sequence_temperatures_and_greedy_rollouts():
  spec = distill.StageSpec(student_k=2, teacher_k=0, tau_min=0.5, tau_max=1.2,
                           greedy_share=0.25)
  tau = np.asarray(distill.sequence_tau(spec, jax.random.key(0), 4000))
  greedy = tau == 0
  assert abs(greedy.mean() - 0.25) < 0.03
  assert tau[~greedy].min() >= 0.5 and tau[~greedy].max() <= 1.2
  assert abs(tau[~greedy].mean() - 0.85) < 0.02
  # One temperature: a plain number (the stage compiles as before ranges existed).
  assert distill.sequence_tau(distill.StageSpec(1, 0), jax.random.key(0), 4) == 1.0
  # The AR rollout at per-sequence temperatures: row by row as at that one temperature; a
  # greedy row is the teacher's argmax chain, with one-hot soft targets.
  teacher = _stage("teacher", 0, seed=1, head_scale=1.0).model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 22, (3, 8)), jnp.int32)
  z = jax.random.uniform(jax.random.key(1), (3, 8, 3))
  taus = jnp.asarray([0.0, 0.7, 1.1])
  got, (ids, w) = rollout.ar_rollout(teacher, tokens, z, taus, blur=(0.01, 4))
  for r, t in enumerate([0.0, 0.7, 1.1]):
    want, (_, w_r) = rollout.ar_rollout(teacher, tokens[r:r + 1], z[r:r + 1], t,
                                        blur=(0.01, 4))
    np.testing.assert_array_equal(np.asarray(got[r]), np.asarray(want[0]))
    # Per-sequence temperatures scale the d-wide state (rollout.ar_rollout): the same logits
    # up to float rounding, so bin edges (and soft weights) agree to ~1e-5.
    np.testing.assert_allclose(np.asarray(w[r]), np.asarray(w_r[0]), atol=1e-4)
  assert (np.asarray(w[0]) == (np.arange(9) == 4)).all()


def test_decoding_outside_the_trained_temperatures_is_an_error():
  k3 = _stage("k3", 3, seed=2)
  meta = {"config": {"distill": {"tau_min": 0.7, "tau_max": 1.1, "greedy_share": 0.0}}}
  engine = decode.Engine.from_stage(dataclasses.replace(k3, meta=meta))
  for tau in (0.0, 0.5, 1.3):
    with pytest.raises(ValueError, match=r"trained at: 0\.7\.\.1\.1$"):
      engine.check(decode.DecodeSpec(k=3, max_new_tokens=4, tau=tau))
  engine.check(decode.DecodeSpec(k=3, max_new_tokens=4, tau=0.9))
  # A stage trained before ranges existed (distill.tau) or converted decodes at that one.
  old = stage_io.Temperatures.from_meta({"config": {"distill": {"tau": 1.0}}}, 3)
  assert (old.lo, old.hi, old.greedy) == (1.0, 1.0, False)
  assert stage_io.Temperatures.from_meta({}, 0).allows(2.5)  # the AR teacher: any


@pytest.mark.slow
def test_a_temperature_conditioned_student_samples_more_diversely_at_higher_temperature():
  """A k=1 student distilled on temperatures 0.4..2.0 (plus greedy windows) from a fixed AR
  teacher: the entropy of its samples over z rises with the temperature it is told, as the
  teacher's does; told temperature 0 it is less diverse than at 1 and mostly gives the
  teacher's argmax (~0.7 of the time after 300 steps)."""
  cfg = model_lib.ModelConfig(vocab_size=12, mask_id=11, d_model=32, n_layers=1, n_heads=2)
  teacher = _stage("teacher", 0, cfg, seed=7, head_scale=1.5)
  student = _stage("k1", 1, cfg, seed=8)
  params = pflm_lib.init_from(teacher.params, dict(student.params))
  spec = distill.StageSpec(student_k=1, teacher_k=0, tau_min=0.4, tau_max=2.0,
                           greedy_share=0.2)
  loss_fn = distill.make_loss_fn(spec, student.graphdef, teacher.graphdef)
  opt = optax.adam(3e-3)
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.integers(0, 11, (512, 8)), jnp.int32)

  @jax.jit
  def step(params, opt_state, i):
    tokens = jax.random.choice(jax.random.fold_in(jax.random.key(1), i), data, (16,))
    grads = jax.grad(lambda p: loss_fn(p, tokens, jax.random.fold_in(jax.random.key(2), i),
                                       teacher.params)[0])(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(300):
    params, opt_state = step(params, opt_state, i)
  m = model_lib.merge(student.graphdef, params)
  ctx = data[:32]
  ctx_rep = jnp.repeat(ctx, 64, axis=0)  # each context under 64 uniforms at its last position
  z = jax.random.uniform(jax.random.key(9), (32 * 64, 8, 1))

  def entropy(tau):
    ids = np.asarray(m.noise_logits(ctx_rep, z, tau)[:, -1, 0].argmax(-1)).reshape(32, 64)
    ent = []
    for row in ids:
      p = np.bincount(row, minlength=12) / 64
      ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(ent)), ids

  h = {tau: entropy(tau) for tau in (0.0, 0.5, 1.0, 1.8)}
  assert h[0.5][0] < h[1.0][0] < h[1.8][0], {t: v[0] for t, v in h.items()}
  argmax = np.asarray(teacher.model()(ctx)[:, -1].argmax(-1))
  # Greedy windows (a fifth of the training): the least diverse, mostly the teacher's argmax.
  assert h[0.0][0] < h[1.0][0], {t: v[0] for t, v in h.items()}
  assert (h[0.0][1] == argmax[:, None]).mean() > 0.6
