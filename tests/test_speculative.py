"""Lossless decoding against independent paths: pflm_verified and greedy spec vs the AR teacher's
own decode (token for token, any batch composition, rows finishing at different steps), the
acceptance counts vs an uncached step-by-step reference, and speculative sampling's output
distribution vs the teacher's exact probabilities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from kforcing_jax.distill import sampling
from kforcing_jax.training import stage_io
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode, speculative

CFG = model_lib.ModelConfig(vocab_size=23, mask_id=22, d_model=32, n_layers=2, n_heads=2)
DRAFT_CFG = dataclasses.replace(CFG, d_model=16, n_layers=1, n_heads=2)
PROMPTS = [[5, 9, 2], [7, 1, 1, 4, 20, 12, 8], [11, 3, 17, 0, 2]]


def _stage(name: str, k: int, cfg=CFG, seed: int = 0, head_scale: float = 0.5):
  cls = pflm_lib.PFLM if k else model_lib.Transformer
  with nnx.use_eager_sharding(False):
    module = cls(cfg, nnx.Rngs(seed))
    graphdef, params = model_lib.split_params(module)
    abstract = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0)))
  # The head is zero-initialised (spec): give it values so tokens depend on the input.
  params["head"] = head_scale * jax.random.normal(jax.random.key(seed + 100),
                                                  params["head"].shape)
  params["head_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 101), (cfg.vocab_size,))
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  params = jax.device_put(params, sharding.param_shardings(abstract, mesh, fsdp=False))
  return stage_io.LoadedStage(stage=name, k=k, model_cfg=cfg, graphdef=graphdef, params=params,
                              tokenizer=None, step=0, meta={}, mesh=mesh)


@pytest.fixture(scope="module")
def models():
  return {"teacher": _stage("teacher", 0, seed=1), "k3": _stage("k3", 3, seed=2),
          "draft": _stage("draft", 0, DRAFT_CFG, seed=3)}


def _ar(teacher, prompts, n, seed, greedy=False, eos=None, row_ids=None):
  spec = decode.DecodeSpec(k=1, max_new_tokens=n, ar=True, tau=0.0 if greedy else 1.0,
                           eos_id=eos)
  return [c.tokens for c in decode.Engine.from_stage(teacher).generate(prompts, spec, seed,
                                                                      row_ids=row_ids)]


@pytest.mark.slow
def test_pflm_verified_is_the_ar_teacher_token_for_token(models):
  engine = speculative.VerifiedEngine(models["teacher"], models["k3"])
  want = _ar(models["teacher"], PROMPTS, 14, seed=5)
  spec = speculative.VerifySpec("pflm_verified", gamma=3, max_new_tokens=14)
  outs, stats_ = engine.generate(PROMPTS, spec, seed=5)
  assert [o.tokens for o in outs] == want
  assert stats_["tokens_per_pass"] >= 1.0
  # Batch composition: a row alone, and the rows in another order with a padded batch.
  alone, _ = engine.generate([PROMPTS[1]], spec, seed=5, row_ids=[1])
  assert alone[0].tokens == want[1]
  rev, _ = engine.generate(PROMPTS[::-1], spec, seed=5, row_ids=[2, 1, 0], batch_size=4)
  assert [o.tokens for o in rev] == want[::-1]
  # k' < k drafts fewer tokens per pass and still gives the teacher's tokens.
  outs2, _ = engine.generate(PROMPTS, dataclasses.replace(spec, gamma=2), seed=5)
  assert [o.tokens for o in outs2] == want


@pytest.mark.slow
@pytest.mark.parametrize("controls", [(0.7, 0, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 4, 1.0, 0.05),
                                      (0.0, 0, 1.0, 0.0)])
def test_pflm_verified_is_the_ar_teacher_under_every_sampling_control(models, controls):
  """Temperature, top-k, top-p, min-p and greedy: the teacher verifies against the transformed
  distribution, so the output is its own decode under the same controls, token for token."""
  t, top_k, top_p, min_p = controls
  kw = dict(tau=t, top_k=top_k, top_p=top_p, min_p=min_p)
  want = [c.tokens for c in decode.Engine.from_stage(models["teacher"]).generate(
      PROMPTS, decode.DecodeSpec(k=1, max_new_tokens=12, ar=True, **kw), seed=9)]
  engine = speculative.VerifiedEngine(models["teacher"], models["k3"])
  spec = speculative.VerifySpec("pflm_verified", gamma=3, max_new_tokens=12, draft_tau=1.0, **kw)
  outs, _ = engine.generate(PROMPTS, spec, seed=9)
  assert [o.tokens for o in outs] == want


@pytest.mark.slow
def test_rows_finishing_at_different_steps_stop_at_their_eos(models):
  free = _ar(models["teacher"], PROMPTS, 14, seed=7)
  # Row 0 stops at the first token (from its 3rd on) it had not produced before; the other rows
  # stop wherever that id appears, or run to max_new_tokens.
  i = next(i for i in range(2, 14) if free[0][i] not in free[0][:i])
  eos = free[0][i]
  want = _ar(models["teacher"], PROMPTS, 14, seed=7, eos=eos)
  assert len(want[0]) == i + 1 and len({len(w) for w in want}) > 1
  engine = speculative.VerifiedEngine(models["teacher"], models["k3"])
  spec = speculative.VerifySpec("pflm_verified", gamma=3, max_new_tokens=14, eos_id=eos)
  outs, _ = engine.generate(PROMPTS, spec, seed=7)
  assert [o.tokens for o in outs] == want
  assert outs[0].finished
  greedy_want = _ar(models["teacher"], PROMPTS, 14, seed=7, greedy=True, eos=eos)
  spec_engine = speculative.VerifiedEngine(models["teacher"], models["draft"])
  outs, _ = spec_engine.generate(PROMPTS, speculative.VerifySpec(
      "spec", gamma=3, max_new_tokens=14, tau=0.0, eos_id=eos), seed=7)
  assert [o.tokens for o in outs] == greedy_want


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spec", "spec_dynamic"])
def test_greedy_spec_is_the_greedy_teacher_token_for_token(models, method):
  want = _ar(models["teacher"], PROMPTS, 13, seed=0, greedy=True)
  spec = speculative.VerifySpec(method, gamma=4, max_new_tokens=13, tau=0.0,
                                confidence=0.3)
  outs, st = speculative.VerifiedEngine(models["teacher"], models["draft"]).generate(
      PROMPTS, spec)
  assert [o.tokens for o in outs] == want
  # The teacher drafting for itself: every draft is accepted, 5 tokens per pass (4 + bonus).
  self_draft = dataclasses.replace(models["teacher"], stage="draft")
  outs, st = speculative.VerifiedEngine(models["teacher"], self_draft).generate(PROMPTS, spec)
  assert [o.tokens for o in outs] == want
  if method == "spec":
    assert all(o.accepted == o.drafted for o in outs[:1]) or st["acceptance"] > 0.9
    assert st["tokens_per_pass"] > 3.0


def _reference_acceptance(teacher, drafter, prompt, row_id, seed, k, n_new, buf=48):
  """Uncached, step by step: the PFLM's noise_logits over the whole prefix drafts k tokens; the
  teacher's full causal forward gives its inverse-CDF tokens; count the accepted prefix.
  (Sequences are right-padded to `buf`: causal, so the padding is never seen.)"""
  t, d = teacher.model(), drafter.model()
  draft_fn = jax.jit(lambda x, z, pos: jnp.argmax(d.noise_logits(
      x, jnp.broadcast_to(z[:, None], (1, buf, k)))[0, pos], -1))
  logits_fn = jax.jit(lambda x: t(x)[0])
  pick = jax.jit(sampling.inverse_cdf)
  key = jnp.asarray(decode.row_keys(seed, [row_id]))
  seq, n, accepted = list(prompt), 0, 0
  pad = lambda ids: jnp.asarray([ids + [0] * (buf - len(ids))], jnp.int32)
  while n < n_new:
    drafts = [int(v) for v in np.asarray(draft_fn(pad(seq), decode.uniforms(key, n, k),
                                                  len(seq) - 1))]
    zt = decode.uniforms(key, n, k + 1)[0]
    logits = logits_fn(pad(seq + drafts))
    tok = [int(pick(logits[len(seq) - 1 + j], zt[j])) for j in range(k + 1)]
    a = 0
    while a < k and drafts[a] == tok[a]:
      a += 1
    seq += tok[:a + 1]
    n += a + 1
    accepted += a
  return seq[len(prompt):][:n_new], accepted


@pytest.mark.slow
def test_acceptance_counts_match_a_step_by_step_reference():
  # A drafter close to the teacher, so that some drafts are accepted and some rejected: the
  # teacher's own weights plus a noise encoder (its noise shifts the logits a little).
  teacher = _stage("teacher", 0, seed=1, head_scale=2.0)
  k2 = _stage("k2", 2, seed=2)
  params = pflm_lib.init_from(teacher.params, dict(k2.params))
  params["noise_encoder"] = jax.tree.map(lambda x: 0.2 * x, k2.params["noise_encoder"])
  drafter = dataclasses.replace(k2, params=params)
  engine = speculative.VerifiedEngine(teacher, drafter)
  spec = speculative.VerifySpec("pflm_verified", gamma=2, max_new_tokens=10)
  outs, _ = engine.generate(PROMPTS, spec, seed=11)
  total = 0
  for r, prompt in enumerate(PROMPTS):
    toks, accepted = _reference_acceptance(teacher, drafter, prompt, r, 11, 2, 10)
    assert outs[r].tokens == toks, f"row {r}"
    assert outs[r].accepted == accepted, f"row {r}"
    total += accepted
  assert 0 < total < sum(o.drafted for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("method,controls", [("spec", (1.0, 0, 1.0, 0.0)),
                                             ("spec", (1.0, 0, 0.9, 0.0)),
                                             ("spec_dynamic", (1.2, 0, 0.95, 0.0))])
def test_speculative_sampling_matches_the_teacher_distribution(method, controls):
  """Two tokens after one prompt, 4000 rows (independent streams): the empirical joint of
  (token 1, token 2) against the teacher's exact p(t1) p(t2 | t1) under the sampling controls
  (temperature, top-p), chi-square at 0.1%."""
  cfg = model_lib.ModelConfig(vocab_size=6, mask_id=5, d_model=16, n_layers=1, n_heads=2)
  teacher = _stage("teacher", 0, cfg, seed=21, head_scale=0.25)
  draft = _stage("draft", 0, dataclasses.replace(cfg, d_model=8), seed=22, head_scale=0.25)
  n_rows, prompt = 4000, [1, 3, 2]
  t_, top_k, top_p, min_p = controls
  spec = speculative.VerifySpec(method, gamma=3, max_new_tokens=2, tau=t_, top_k=top_k,
                                top_p=top_p, min_p=min_p, confidence=0.3)
  outs, st = speculative.VerifiedEngine(teacher, draft).generate([prompt] * n_rows, spec, seed=0)
  assert 0.05 < st["acceptance"] < 0.95  # both the accept and the residual branch are exercised
  t = teacher.model()
  probs = lambda logits: np.asarray(sampling.probabilities(logits, *controls))
  p1 = probs(t(jnp.asarray([prompt]))[0, -1])
  seqs = jnp.asarray([prompt + [a] for a in range(5)])
  p2 = probs(t(seqs)[:, -1])  # (5, V)
  joint = (p1[:5, None] * p2[:, :5]).ravel()
  counts = np.zeros(25)
  for o in outs:
    counts[o.tokens[0] * 5 + o.tokens[1]] += 1
  expected = joint / joint.sum() * n_rows
  keep = expected >= 5  # chi-square validity; pool the rest into one cell
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(expected[keep], expected[~keep].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  chi2 = ((obs - exp) ** 2 / exp).sum()
  assert chi2 < stats.chi2.ppf(0.999, len(obs) - 1), (chi2, obs, exp)
  # The draft alone has a different distribution: the test can tell them apart.
  q1 = probs(draft.model()(jnp.asarray([prompt]))[0, -1])
  assert np.abs(q1 - p1).max() > 0.05


def test_bad_pairings_are_rejected(models):
  with pytest.raises(ValueError, match="AR draft model"):
    speculative.VerifiedEngine(models["teacher"], models["k3"]).check(
        speculative.VerifySpec("spec", gamma=3, max_new_tokens=4))
  with pytest.raises(ValueError, match="trained window"):
    speculative.VerifiedEngine(models["teacher"], models["k3"]).check(
        speculative.VerifySpec("pflm_verified", gamma=4, max_new_tokens=4))
  with pytest.raises(ValueError, match="verifier must be the AR teacher"):
    speculative.VerifiedEngine(models["k3"], models["draft"])
  with pytest.raises(ValueError, match="top_p"):
    speculative.VerifySpec("pflm_verified", gamma=2, max_new_tokens=4, top_p=0.0)
