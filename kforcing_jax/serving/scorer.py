"""Scoring under the models: NLL of continuations under an AR model, a PFLM window's per-offset
NLL / accuracy against the AR teacher's rollout, and the teacher's reference points for them.

A `Scorer` owns its compiled functions, one per model structure (graphdef) and setting, so an
evaluation that scores many stages with one scorer compiles each function once; nothing is
cached at module level. What the numbers mean is described in quality.py (the runner).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.distill import targets as distill, losses, rollout
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.serving import decode, quality_metrics

# Validation rows behind the teacher row's reference points (offset_floors).
FLOOR_ROWS = 32

# Rows per jitted call of the per-offset metrics: (rows, N, k, V) float32 logits are ~1 GB at
# 64 rows of 128 tokens, k=4 and 8192 ids.
ROW_CHUNK = 32


def _row_chunks(b: int):
  """Row indices of fixed-size chunks of b rows (the last one padded with row 0) and the number
  of real rows in each: one compile and bounded memory, each row keeping its own uniforms."""
  size = min(ROW_CHUNK, b)
  for lo in range(0, b, size):
    idx = np.arange(lo, lo + size)
    real = int(min(size, b - lo))
    idx[real:] = 0
    yield idx, real


class Scorer:
  """The scoring functions, each compiled once per (function, model structure, setting)."""

  def __init__(self):
    self._compiled: dict = {}

  def _fn(self, key: tuple, build: Callable[[], Callable]) -> Callable:
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  # ---- NLL under an AR model ----

  def _nll_fn(self, graphdef):
    def build():
      @jax.jit
      def nll(params, tokens_BxL, mask_BxL):
        """Per-row summed NLL of the tokens where mask (positions >= 1) under the causal
        model, and per-row token counts."""
        logits = model_lib.merge(graphdef, params)(tokens_BxL[:, :-1])
        tok_nll = losses.token_nll(logits, tokens_BxL[:, 1:])
        m = mask_BxL[:, 1:].astype(jnp.float32)
        return (tok_nll * m).sum(-1), m.sum(-1)
      return nll
    return self._fn(("nll", graphdef), build)

  def continuation_nll_rows(self, graphdef, params, pairs: Sequence[tuple[list[int], list[int]]],
                            batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: (summed NLL, token count) of the continuation given its context, under an AR
    model."""
    fn = self._nll_fn(graphdef)
    length = decode.bucket_len(max(len(c) + len(t) for c, t in pairs))
    sums, counts = [], []
    for lo in range(0, len(pairs), batch_size):
      chunk = list(pairs[lo:lo + batch_size])
      real = len(chunk)
      chunk += [([0], [])] * (batch_size - len(chunk))  # fixed shape: empty rows count nothing
      toks = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), bool)
      for r, (ctx, cont) in enumerate(chunk):
        toks[r, :len(ctx) + len(cont)] = ctx + cont
        mask[r, len(ctx):len(ctx) + len(cont)] = True
      s, n = fn(params, toks, mask)
      sums.append(np.asarray(s, np.float64)[:real])
      counts.append(np.asarray(n, np.int64)[:real])
    return np.concatenate(sums), np.concatenate(counts)

  def continuation_nll(self, graphdef, params, pairs: Sequence[tuple[list[int], list[int]]],
                       batch_size: int = 32) -> tuple[float, int]:
    """(summed NLL, token count) of all continuations given their contexts, under an AR
    model."""
    s, n = self.continuation_nll_rows(graphdef, params, pairs, batch_size)
    return float(s.sum()), int(n.sum())

  def data_nll_rows(self, graphdef, params, tokens_BxN: np.ndarray) -> np.ndarray:
    """Each row's mean NLL of its tokens 1.. under an AR model."""
    pairs = [([int(r[0])], [int(t) for t in r[1:]]) for r in tokens_BxN]
    s, n = self.continuation_nll_rows(graphdef, params, pairs)  # batches of 32: bounded memory
    return s / n

  # ---- a PFLM window against the AR teacher's rollout ----

  def offset_metrics(self, student_graphdef, student_params, teacher_graphdef, teacher_params,
                     tokens_BxN: np.ndarray, k: int, seed: int = 0, tau: float = 1.0) -> dict:
    """NLL_j / acc_j / acc_all of a PFLM window of k against AR inverse-CDF rollout targets at
    temperature tau (the student told the same tau), and `row_nll`, each row's mean NLL_j (a
    (B, k) list: for paired comparisons row by row)."""

    def build():
      @jax.jit
      def run(sp, tp, tokens, z):
        teacher = model_lib.merge(teacher_graphdef, tp)
        targets, logits = rollout.ar_rollout(teacher, tokens, z, tau, with_logits=True)
        q = jnp.exp(-losses.token_nll(logits, targets))  # the teacher's probability of each
        nll, hit, pred = distill.window_scores(model_lib.merge(student_graphdef, sp), tokens, z,
                                               targets, tau, with_argmax=True)
        return nll, hit, pred, targets, q
      return run

    run = self._fn(("offset_metrics", student_graphdef, teacher_graphdef, tau), build)
    tokens = np.asarray(tokens_BxN)
    z = np.asarray(jax.random.uniform(jax.random.key(seed), (*tokens.shape, k), jnp.float32))
    parts = []
    for idx, real in _row_chunks(len(tokens)):
      out = run(student_params, teacher_params, jnp.asarray(tokens[idx]), jnp.asarray(z[idx]))
      parts.append([np.asarray(a)[:real] for a in out])
    nll, hit, pred, tgt, q = (np.concatenate(a) for a in zip(*parts))
    loss, aux = distill.summarize_windows(jnp.asarray(nll), jnp.asarray(hit),
                                          jnp.ones(nll.shape))
    return {"nll": float(loss), **{name: float(v) for name, v in aux.items()},
            **quality_metrics.miss_anatomy(pred.reshape(-1, k), tgt.reshape(-1, k),
                                           q.reshape(-1, k), nll.reshape(-1, k)),
            "row_nll": nll.mean(1).tolist()}

  def offset_floors(self, teacher_graphdef, teacher_params, tokens_BxN: np.ndarray, k: int,
                    samples: int = 32, seed: int = 0) -> dict:
    """Reference points for a student's NLL_j against AR rollout targets, from the teacher alone.

    blind_j   the entropy of the teacher's j-step-ahead marginal p_j(. | context): the NLL_j of
              a student that ignores z_1..z_j (the best it can do without the noise). Estimated
              from `samples` independent k-round rollouts, whose offset-j conditionals average
              to p^_j (unbiased for p_j): H(p^_j) under-estimates it (`blind_lo_j`) and
              -log p^_j(y) for y of one more independent rollout over-estimates it (`blind_j`,
              the conservative one); they meet as `samples` grows (blind_lo_1 is exact).
    prefix_j  the mean entropy of the teacher's offset-j conditional given the rollout's own
              prefix: the NLL_j of a student that decodes offsets < j exactly but ignores z_j
              (equal to blind_lo_1 at j = 1; near the teacher's data NLL).
    """

    def build_one():
      @jax.jit
      def one(tp, tokens, z):
        ys, logits = rollout.ar_rollout(model_lib.merge(teacher_graphdef, tp), tokens, z,
                                        with_logits=True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return ys, jnp.exp(logp), -(jnp.exp(logp) * logp).sum(-1)
      return one

    def build_floors():
      @jax.jit
      def floors(p_sum, ent_sum, y):
        p_hat = p_sum / samples
        blind = -jnp.log(jnp.take_along_axis(p_hat, y[..., None], axis=-1)[..., 0])
        blind_lo = -(p_hat * jnp.log(jnp.maximum(p_hat, 1e-30))).sum(-1)
        return {"blind": blind.sum(1), "blind_lo": blind_lo.sum(1),
                "prefix": (ent_sum / samples).sum(1)}
      return floors

    one = self._fn(("floor_rollout", teacher_graphdef), build_one)
    floors = self._fn(("floors", samples), build_floors)
    tokens = np.asarray(tokens_BxN)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x5EED), samples + 1)
    zs = [np.asarray(jax.random.uniform(key, (*tokens.shape, k), jnp.float32)) for key in keys]
    sums = {"blind": 0.0, "blind_lo": 0.0, "prefix": 0.0}
    for idx, real in _row_chunks(len(tokens)):
      tok_c = jnp.asarray(tokens[idx])
      p_sum, ent_sum = 0.0, 0.0
      for z in zs[:samples]:
        _, p, ent = one(teacher_params, tok_c, jnp.asarray(z[idx]))
        p_sum, ent_sum = p_sum + p, ent_sum + ent
      y, _, _ = one(teacher_params, tok_c, jnp.asarray(zs[samples][idx]))
      for name, x in floors(p_sum, ent_sum, y).items():
        sums[name] = sums[name] + np.asarray(x, np.float64)[:real].sum(0)
    count = tokens.shape[0] * tokens.shape[1]
    return {f"{name}_{j + 1}": float(v / count) for name, x in sums.items()
            for j, v in enumerate(x)}
