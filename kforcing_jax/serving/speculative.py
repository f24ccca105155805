"""Lossless decoding with the AR teacher as verifier: `pflm_verified` (a PFLM(k) drafts k tokens
from the row's own uniforms) and speculative decoding with a small AR draft model (`spec`, with a
fixed lookahead gamma, and `spec_dynamic`, which stops drafting when the draft is unsure).

Each step drafts up to gamma tokens, then the teacher scores [pending token ; drafts] in ONE
forward pass and accepts a prefix; the step emits accepted + 1 tokens. Rows accept different
numbers of tokens, so every row keeps its own cache lengths (`Transformer.forward_cached` with
per-row starts) inside one fixed-shape jitted step: no recompiling, no waiting for a slow row.

Layout: `seq` holds each row's left-padded prompt (P slots) then its generated tokens (slot
P + i = generated token i). A model's cache holds valid keys/values for slots [0, len_b). The
teacher's cache always stops one short of the committed tokens (the last one is "pending": it is
fed with the next drafts), so a step is prefill-free: the prompt's last token is the first
pending token.

Acceptance:
- pflm_verified: the teacher's own token at generated index i is its inverse-CDF sample under
  the row's uniform z_i (the stream `decode.uniforms`, the same one the AR baseline and the PFLM
  use). Accept the longest prefix where the drafts equal those tokens, then emit the teacher's
  token at the first disagreement (or after the last draft). The output is therefore token for
  token the AR teacher's inverse-CDF decode with the same seed; the acceptance measures how
  faithful the student is.
- spec (sampling): standard speculative sampling: accept draft d with probability
  min(1, p(d)/q(d)), else sample from normalise(max(0, p - q)); after gamma accepted drafts,
  sample the bonus token from p. The output distribution is exactly the teacher's at tau.
- spec (greedy): accept while the draft equals the teacher's argmax: the output is the teacher's
  greedy decode token for token.
- spec_dynamic: like spec, but a row stops drafting after a token whose draft probability is
  below `confidence` (Hugging Face's assistant_confidence_threshold); the loop stops as soon as
  every row has stopped.
"""

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.distill import sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode

METHODS = ("pflm_verified", "spec", "spec_dynamic")
# Uniform streams of a row besides decode's stream 0 (the teacher's inverse-CDF / PFLM noise).
DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class VerifySpec(sampling.ControlFields):
  """Static settings of a verified decode (hashable: one program per spec, batch, prompt bucket)."""
  method: str  # one of METHODS
  gamma: int  # tokens drafted per teacher pass (pflm_verified: the PFLM's k' <= trained k)
  max_new_tokens: int
  # The teacher's sampling controls (sampling.Controls; tau 0 = greedy: argmax acceptance). The
  # output is exactly the AR teacher's decode under them.
  tau: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  # pflm_verified: the temperature fed to the drafting PFLM's noise encoder (any value keeps the
  # output lossless; one inside the stage's trained range drafts best). None: tau.
  draft_tau: float | None = None
  confidence: float = 0.4  # spec_dynamic: stop drafting below this draft probability
  eos_id: int | None = None
  fill_id: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"VerifySpec.method must be one of {METHODS}, got {self.method!r}")
    if self.gamma < 1:
      raise ValueError(f"VerifySpec.gamma must be >= 1, got {self.gamma}")
    if self.max_new_tokens < 1:
      raise ValueError(f"VerifySpec.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    sampling.check_controls(self.tau, self.top_k, self.top_p, self.min_p)
    if not 0.0 <= self.confidence <= 1.0:
      raise ValueError(f"VerifySpec.confidence must be in [0, 1], got {self.confidence}")

  def seq_len(self, prompt_len: int) -> int:
    """Slots of `seq` and of both caches: room for a full step past max_new_tokens."""
    return prompt_len + self.max_new_tokens + 2 * self.gamma + 2


@flax.struct.dataclass
class VerifyState:
  seq_BxS: jax.Array  # left-padded prompt, then generated tokens (junk beyond n_B)
  n_B: jax.Array  # generated (committed) tokens per row
  t_cache: tuple  # teacher (cache_k, cache_v); valid slots [0, P + n_B - 1)
  d_cache: tuple  # drafter (cache_k, cache_v)
  d_len_B: jax.Array  # drafter's valid slots
  pad_B: jax.Array
  keys_Bx2: jax.Array
  done_B: jax.Array
  passes: jax.Array  # () teacher forward passes so far (the prefill excluded)
  drafted_B: jax.Array  # drafts proposed by live rows, summed over steps
  accepted_B: jax.Array  # drafts accepted
  plen_B: jax.Array  # prompt slots of each row: generated token i sits at slot plen_B + i
  limit_B: jax.Array  # a row is done once it has this many tokens (its max_new_tokens)


def _gather(x_BxS: jax.Array, start_B: jax.Array, n: int) -> jax.Array:
  """x[b, start_b : start_b + n] for every row."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, n))(x_BxS, start_B)


def _scatter(x_BxS: jax.Array, new_BxN: jax.Array, start_B: jax.Array) -> jax.Array:
  return jax.vmap(lambda row, v, s: jax.lax.dynamic_update_slice_in_dim(row, v, s, 0))(
      x_BxS, new_BxN, start_B)


def _leading(ok_BxG: jax.Array) -> jax.Array:
  """Length of the all-True prefix of each row."""
  return jnp.cumprod(ok_BxG.astype(jnp.int32), axis=1).sum(axis=1)


def prefill_cache(m, prompt_BxP, pad_B, n_slots: int, cache_sharding=None) -> tuple:
  """A model's (cache_k, cache_v) of n_slots slots, valid over the prompt's first P-1 slots
  (its last token is pending: the first verify step feeds it)."""
  ck, cv = model_lib.init_cache(m.cfg, prompt_BxP.shape[0], n_slots, cache_sharding)
  _, ck, cv = m.forward_cached(m.embed(prompt_BxP[:, :-1]), ck, cv, 0, pad_B, n_out=1,
                               fresh=True)
  return ck, cv


def prefill(teacher, drafter, spec: VerifySpec, prompt_BxP, pad_B, keys_Bx2,
            cache_sharding=None) -> VerifyState:
  """Both caches over the prompt's first P-1 slots; the prompt's last token is pending."""
  b, plen = prompt_BxP.shape
  slots = spec.seq_len(plen)
  seq = jnp.full((b, slots), spec.fill_id, jnp.int32).at[:, :plen].set(prompt_BxP)
  fill = lambda m: prefill_cache(m, prompt_BxP, pad_B, slots, cache_sharding)
  zeros = jnp.zeros((b,), jnp.int32)
  return VerifyState(seq_BxS=seq, n_B=zeros, t_cache=fill(teacher), d_cache=fill(drafter),
                     d_len_B=zeros + (plen - 1), pad_B=pad_B.astype(jnp.int32),
                     keys_Bx2=keys_Bx2, done_B=jnp.zeros((b,), bool),
                     passes=jnp.zeros((), jnp.int32), drafted_B=zeros, accepted_B=zeros,
                     plen_B=zeros + plen, limit_B=zeros + spec.max_new_tokens)


def _draft_pflm(m, spec: VerifySpec, s: VerifyState, controls, draft_tau):
  """PFLM(k) drafts from the row's uniforms: input [committed tokens not yet in its cache (1 to
  k+1 of them) ; k noise], W = 2k+1 positions; drafts = argmax at the noise positions."""
  k = spec.gamma
  c_B = s.plen_B + s.n_B - s.d_len_B  # real tokens to feed, in [1, k + 1]
  toks_BxK1 = _gather(s.seq_BxS, s.d_len_B, k + 1)
  noise_BxKxD = decode.noise(m, s.keys_Bx2, s.n_B, k, draft_tau)
  w = jnp.arange(2 * k + 1)
  tok_x = m.embed(jnp.concatenate([toks_BxK1, jnp.zeros_like(toks_BxK1[:, :k])], 1))
  j_BxW = jnp.clip(w[None, :] - c_B[:, None], 0, k - 1)
  noise_x = jnp.take_along_axis(noise_BxKxD, j_BxW[..., None], axis=1)
  is_tok = (w[None, :] < c_B[:, None])[..., None]
  x = jnp.where(is_tok, tok_x, noise_x)  # positions >= c + k are junk past every query we read
  h, ck, cv = m.forward_cached(x, *s.d_cache, s.d_len_B, s.pad_B)
  h_BxKxD = jnp.take_along_axis(h, (c_B[:, None] + jnp.arange(k)[None, :])[..., None], axis=1)
  drafts = jnp.argmax(m.logits(h_BxKxD), axis=-1).astype(jnp.int32)
  gamma_B = jnp.full_like(s.n_B, k)
  d_len_B = s.d_len_B + c_B
  return drafts, None, gamma_B, (ck, cv), lambda a_B: d_len_B


def _draft_ar(m, spec: VerifySpec, s: VerifyState, controls, draft_tau):
  """The AR draft model proposes up to gamma tokens one by one (a fori/while loop of 1-token
  passes after one 2-token pass that re-feeds the last committed token when it is cached)."""
  g = spec.gamma
  b = s.n_B.shape[0]
  plen = s.plen_B
  start_B = plen + s.n_B - 2  # the last two committed tokens (one may be cached already)
  x = m.embed(_gather(s.seq_BxS, start_B, 2))
  h, ck, cv = m.forward_cached(x, *s.d_cache, start_B, s.pad_B, n_out=1)
  z_BxG = decode.uniforms(s.keys_Bx2, s.n_B, g, stream=DRAFT_STREAM)
  v = m.cfg.vocab_size

  def pick(logits_BxV, i):
    # The draft samples under the teacher's controls: the closer q is to p, the more accepted.
    y = controls.sample(logits_BxV, z_BxG[:, i])
    probs = jax.nn.softmax(controls.transformed(logits_BxV), axis=-1)
    return y, probs

  y0, q0 = pick(m.logits(h)[:, 0], 0)
  drafts = jnp.zeros((b, g), jnp.int32).at[:, 0].set(y0)
  q_BxGxV = jnp.zeros((b, g, v), jnp.float32).at[:, 0].set(q0)
  conf = jnp.take_along_axis(q0, y0[:, None], axis=1)[:, 0]
  going_B = jnp.ones((b,), bool)
  if spec.method == "spec_dynamic":
    going_B = conf >= spec.confidence
  gamma_B = jnp.ones((b,), jnp.int32)

  def cond(c):
    i, going = c[0], c[-1]
    return (i < g) & jnp.any(going)

  def body(c):
    i, drafts, q, cache, gamma_B, going = c
    prev = jnp.take_along_axis(drafts, jnp.full((b, 1), i - 1), axis=1)
    h, ck, cv = m.forward_cached(m.embed(prev), *cache, plen + s.n_B + i - 1, s.pad_B)
    y, probs = pick(m.logits(h)[:, 0], i)
    drafts = drafts.at[:, i].set(y)
    q = q.at[:, i].set(probs)
    gamma_B = gamma_B + going.astype(jnp.int32)
    if spec.method == "spec_dynamic":
      going = going & (jnp.take_along_axis(probs, y[:, None], axis=1)[:, 0] >= spec.confidence)
    return i + 1, drafts, q, (ck, cv), gamma_B, going

  carry = (jnp.ones((), jnp.int32), drafts, q_BxGxV, (ck, cv), gamma_B, going_B)
  n_drafted, drafts, q_BxGxV, cache, gamma_B, _ = jax.lax.while_loop(cond, body, carry)
  # Cached now: every slot up to the pending token, then the drafts fed back (all but the last
  # drafted); of those, the ones the teacher accepts stay valid.
  n = s.n_B
  return drafts, q_BxGxV, gamma_B, cache, lambda a_B: plen + n + jnp.minimum(a_B, n_drafted - 1)


def _verify(teacher, spec: VerifySpec, s: VerifyState, controls, drafts_BxG, q_BxGxV, gamma_B):
  """The teacher scores [pending ; drafts] in one pass: (emitted tokens (B, G+1), accepted a_B,
  teacher cache). Rows emit a_B + 1 tokens: the accepted drafts, then the teacher's token."""
  g = spec.gamma
  b = s.n_B.shape[0]
  plen = s.plen_B
  pending = _gather(s.seq_BxS, plen + s.n_B - 1, 1)
  x = teacher.embed(jnp.concatenate([pending, drafts_BxG], axis=1))
  h, ck, cv = teacher.forward_cached(x, *s.t_cache, plen + s.n_B - 1, s.pad_B)
  logits_BxG1xV = teacher.logits(h)
  valid_BxG = jnp.arange(g)[None, :] < gamma_B[:, None]
  greedy = isinstance(controls.temperature, (int, float)) and controls.temperature == 0
  if spec.method == "pflm_verified" or greedy:
    # The teacher's own tokens (its argmax, or its inverse-CDF samples under the row's uniforms;
    # per-row controls take the argmax in their temperature-0 rows).
    z = None if greedy else decode.uniforms(s.keys_Bx2, s.n_B, g + 1)
    t_BxG1 = controls.sample(logits_BxG1xV, z)
    a_B = _leading((drafts_BxG == t_BxG1[:, :g]) & valid_BxG)
    return t_BxG1, a_B, (ck, cv)
  # Speculative sampling against the transformed teacher distribution (one-hot on the argmax in
  # per-row temperature-0 rows: then it accepts exactly the drafts equal to the argmax).
  p_BxG1xV = controls.probabilities(logits_BxG1xV)
  p_d = jnp.take_along_axis(p_BxG1xV[:, :g], drafts_BxG[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q_BxGxV, drafts_BxG[..., None], axis=-1)[..., 0]
  r_BxG = decode.uniforms(s.keys_Bx2, s.n_B, g, stream=ACCEPT_STREAM)
  a_B = _leading((r_BxG * q_d < p_d) & valid_BxG)  # r < p/q without dividing by q
  rows = jnp.arange(b)
  p_a = p_BxG1xV[rows, a_B]
  q_a = jnp.where((a_B < gamma_B)[:, None], q_BxGxV[rows, jnp.minimum(a_B, g - 1)], 0.0)
  residual = jnp.maximum(p_a - q_a, 0.0)
  # Rejections happen only where p < q somewhere, so the residual has mass; guard float ties.
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_a)
  u = decode.uniforms(s.keys_Bx2, s.n_B + a_B, 1, stream=RESIDUAL_STREAM)[:, 0]
  x_a = sampling.inverse_cdf(jnp.log(residual), u)
  out = jnp.concatenate([drafts_BxG, jnp.zeros((b, 1), jnp.int32)], axis=1)
  out = out.at[rows, a_B].set(x_a)
  return out, a_B, (ck, cv)


def verify_step(teacher, drafter, spec: VerifySpec, s: VerifyState,
                controls: sampling.Controls | None = None, draft_tau=None) -> VerifyState:
  """One teacher pass: draft, verify, commit a_B + 1 tokens per live row. `controls` /
  `draft_tau`: per-row arrays (the serving engine) instead of the spec's numbers."""
  if controls is None:
    controls = spec.controls
    draft_tau = spec.tau if spec.draft_tau is None else spec.draft_tau
  draft = _draft_pflm if spec.method == "pflm_verified" else _draft_ar
  drafts, q, gamma_B, d_cache, d_len_fn = draft(drafter, spec, s, controls, draft_tau)
  plen = s.plen_B
  out_BxG1, a_B, t_cache = _verify(teacher, spec, s, controls, drafts, q, gamma_B)
  d_len = d_len_fn(a_B)
  emit_B = a_B + 1
  if spec.eos_id is not None:  # stop at the first EOS among the emitted tokens
    is_eos = (out_BxG1 == spec.eos_id) & (jnp.arange(spec.gamma + 1)[None, :] < emit_B[:, None])
    first = jnp.argmax(is_eos, axis=1)
    hit = is_eos.any(axis=1)
    emit_B = jnp.where(hit, first + 1, emit_B)
  else:
    hit = jnp.zeros_like(s.done_B)
  live = ~s.done_B
  seq = jnp.where(live[:, None], _scatter(s.seq_BxS, out_BxG1, plen + s.n_B), s.seq_BxS)
  n_B = jnp.where(live, s.n_B + emit_B, s.n_B)
  # A finished row's caches are written past its valid slots only: harmless, so not masked.
  return s.replace(
      seq_BxS=seq, n_B=n_B, t_cache=t_cache, d_cache=d_cache,
      d_len_B=jnp.where(live, d_len, s.d_len_B),
      done_B=s.done_B | (live & (hit | (n_B >= s.limit_B))),
      passes=s.passes + 1,
      drafted_B=s.drafted_B + jnp.where(live, gamma_B, 0),
      accepted_B=s.accepted_B + jnp.where(live, a_B, 0))


def emitting_step(teacher, drafter, spec: VerifySpec, s: VerifyState,
                  controls: sampling.Controls, draft_tau) -> tuple:
  """`verify_step` with per-row controls that also returns what it committed: (state, tokens
  (B, gamma + 1) of which each row's first `emitted_B` are new, emitted_B, drafted_B this step)
  (the serving engine delivers them; done rows emit nothing)."""
  new = verify_step(teacher, drafter, spec, s, controls, draft_tau)
  toks_BxG1 = _gather(new.seq_BxS, s.plen_B + s.n_B, spec.gamma + 1)
  return new, toks_BxG1, new.n_B - s.n_B, new.drafted_B - s.drafted_B


def generate(teacher, drafter, spec: VerifySpec, prompt_BxP, pad_B, keys_Bx2,
             cache_sharding=None) -> VerifyState:
  """Prefill, then verify steps in a `lax.while_loop` until every row is done."""
  state = prefill(teacher, drafter, spec, prompt_BxP, pad_B, keys_Bx2, cache_sharding)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B),
                            lambda s: verify_step(teacher, drafter, spec, s), state)


@dataclasses.dataclass
class VerifiedCompletion(decode.Completion):
  drafted: int = 0  # drafts proposed for this row
  accepted: int = 0  # drafts the teacher accepted


class VerifiedEngine:
  """Jitted lossless decoding: the AR teacher verifies a drafter (a PFLM stage or the draft).

  engine = VerifiedEngine(stage_io.load_stage(w, "teacher"), stage_io.load_stage(w, "k4"))
  outs, stats = engine.generate(prompts, VerifySpec("pflm_verified", gamma=4, max_new_tokens=64))
  """

  def __init__(self, teacher, drafter):
    """`teacher` and `drafter` are stage_io.LoadedStage on the same mesh."""
    if teacher.k != 0:
      raise ValueError(f"the verifier must be the AR teacher, got stage {teacher.stage!r}")
    if teacher.model_cfg.vocab_size != drafter.model_cfg.vocab_size:
      raise ValueError("teacher and drafter vocabularies differ: "
                       f"{teacher.model_cfg.vocab_size} vs {drafter.model_cfg.vocab_size}")
    self.teacher, self.drafter = teacher, drafter
    self.mesh = teacher.mesh
    self.base = decode.Engine.from_stage(teacher)  # padding, row keys, input shardings
    self._programs: dict = {}

  def check(self, spec: VerifySpec) -> None:
    pflm = spec.method == "pflm_verified"
    if pflm and not 1 <= spec.gamma <= self.drafter.k:
      raise ValueError(f"pflm_verified drafts k'={spec.gamma} tokens; the drafter "
                       f"{self.drafter.stage!r} has trained window k={self.drafter.k}")
    if not pflm and self.drafter.k != 0:
      raise ValueError(f"{spec.method} needs an AR draft model (stage 'draft'), got "
                       f"{self.drafter.stage!r}")

  def _program(self, spec: VerifySpec, batch: int, plen: int):
    key = (spec, batch, plen)
    if key not in self._programs:
      mesh, tg, dg = self.mesh, self.teacher.graphdef, self.drafter.graphdef
      d1, d2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
      cache_sh = sharding.cache_sharding(mesh)
      sh = lambda t: jax.tree.map(lambda x: x.sharding, t)

      def run(tp, dp, x, pad, keys):
        s = generate(model_lib.merge(tg, tp), model_lib.merge(dg, dp), spec, x, pad, keys,
                     cache_sh)
        return s.seq_BxS[:, plen:plen + spec.max_new_tokens], s.n_B, s.passes, s.drafted_B, \
            s.accepted_B

      self._programs[key] = jax.jit(
          run, in_shardings=(sh(self.teacher.params), sh(self.drafter.params), d2, d1, d2),
          out_shardings=(d2, d1, sharding.replicated(mesh), d1, d1))
    return self._programs[key]

  def generate_arrays(self, spec: VerifySpec, prompt_BxP, pad_B, keys_Bx2):
    """Device arrays in; (tokens (B, T), n (B,), teacher passes (), drafted (B,), accepted (B,))."""
    self.check(spec)
    fn = self._program(spec, prompt_BxP.shape[0], prompt_BxP.shape[1])
    return fn(self.teacher.params, self.drafter.params, prompt_BxP, pad_B, keys_Bx2)

  def generate(self, prompts: Sequence[Sequence[int]], spec: VerifySpec, seed: int = 0,
               row_ids: Sequence[int] | None = None, batch_size: int | None = None,
               prompt_len: int | None = None) -> tuple[list[VerifiedCompletion], dict]:
    """Completions (row r's uniforms from (seed, row_ids[r]), as in `decode.Engine`) and stats:
    teacher passes, mean tokens per teacher pass, acceptance rate."""
    inputs = self.base.device_inputs(prompts, seed, row_ids, prompt_len, spec.fill_id,
                                     batch_size)
    tokens, n, passes, drafted, accepted = jax.device_get(self.generate_arrays(spec, *inputs))
    n_rows = len(prompts)
    out = []
    for row, length, dr, ac in zip(tokens[:n_rows], n[:n_rows], drafted[:n_rows],
                                   accepted[:n_rows]):
      toks, finished = decode.truncate(row, length, spec.max_new_tokens, spec.eos_id)
      out.append(VerifiedCompletion(toks, finished, int(dr), int(ac)))
    return out, summarize(n[:n_rows], int(passes), drafted[:n_rows], accepted[:n_rows],
                          spec.max_new_tokens)


def summarize(n_B, passes: int, drafted_B, accepted_B, max_new: int) -> dict:
  """Acceptance figures of one batch. tokens_per_pass: tokens a row gains per teacher pass
  (AR = 1), averaged over rows, each over the passes it was live for."""
  emitted = np.minimum(np.asarray(n_B), max_new)
  drafted, accepted = np.asarray(drafted_B), np.asarray(accepted_B)
  # A live row emits accepted + 1 per pass: its passes = n - accepted (before truncation).
  row_passes = np.maximum(np.asarray(n_B) - accepted, 1)
  return {"teacher_passes": passes,
          "tokens_per_pass": float(np.mean(emitted / row_passes)),
          "acceptance": float(accepted.sum() / max(drafted.sum(), 1)),
          "mean_accepted_per_pass": float(np.mean(accepted / row_passes))}
