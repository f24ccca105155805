"""Sample quality of the AR teacher and every PFLM stage at k = 1..k_max, on held-out prompts.

Per (stage, k), on validation prompts (the first `prompt_len` tokens of validation rows) with
fixed-length completions (no EOS stop) from per-row uniform streams (seed, row):
  gen_ppl        exp(mean NLL of the completion tokens) under the AR teacher (and, optionally,
                 under any other AR checkpoint: `eval_ppl`, re-tokenising the text if its
                 tokenizer differs). Low Gen-PPL alone can mean dull text: read it next to
  entropy        the mean unigram entropy (nats) of each sample's tokens (`entropy_by_offset`:
                 the unigram entropy of all samples' tokens pooled by their offset in a k-token
                 block, which shows where a PFLM's samples lose diversity; the AR and lossless
                 rows, whose samples follow the teacher, are split by the largest k), and
  rep_n          the fraction of a sample's n-grams that already occurred earlier in it (n=2, 4).
  agree          the fraction of completion tokens equal to the AR teacher's own inverse-CDF
                 rollout from the SAME uniforms (a perfect PFLM gives 1.0), and `prefix`, the
                 mean fraction of the completion before the first disagreement.
  nll_j, acc_j,  per-offset NLL / accuracy (and all k right) of the PFLM's one-pass window
  acc_all        against the AR teacher's k-round inverse-CDF rollout targets on validation
                 contexts (distill.student_loss on rollout.ar_rollout targets). The teacher row
                 reports its data NLL instead, and two reference points for nll_j
                 (`offset_floors`): `blind_j`, what a student that ignores the noise scores,
                 and `prefix_j`, what one that decodes offsets < j exactly but ignores z_j
                 scores. nll_j - prefix_j is what the student loses to an imperfect prefix.
                 `gap_j` / `gap_se_j`: nll_j minus the teacher's data NLL, paired row by row
                 on the same validation rows, and its standard error over rows.
                 `miss_anatomy` (the full window's row): acc_j by the width of the target's
                 inverse-CDF bin, acc_j after hits at the earlier offsets, and the entropy of
                 the student's argmax tokens against the targets'.
"""

import collections
import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.observe import metrics_log
from kforcing_jax.serving import decode
from kforcing_jax.distill import targets as distill, losses, rollout
from kforcing_jax.model import transformer as model_lib


# ---- scoring and text statistics ----


_NLL_FNS: dict = {}


def _nll_fn(graphdef):
  """One jitted scorer per model structure (reused across calls: no recompiles)."""
  if graphdef in _NLL_FNS:
    return _NLL_FNS[graphdef]

  @jax.jit
  def nll(params, tokens_BxL, mask_BxL):
    """Per-row summed NLL of the tokens where mask (positions >= 1) under the causal model,
    and per-row token counts."""
    logits = model_lib.merge(graphdef, params)(tokens_BxL[:, :-1])
    tok_nll = losses.token_nll(logits, tokens_BxL[:, 1:])
    m = mask_BxL[:, 1:].astype(jnp.float32)
    return (tok_nll * m).sum(-1), m.sum(-1)
  _NLL_FNS[graphdef] = nll
  return nll


def continuation_nll_rows(graphdef, params, pairs: Sequence[tuple[list[int], list[int]]],
                          batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Per pair: (summed NLL, token count) of the continuation given its context, under an AR
  model."""
  fn = _nll_fn(graphdef)
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


def continuation_nll(graphdef, params, pairs: Sequence[tuple[list[int], list[int]]],
                     batch_size: int = 32) -> tuple[float, int]:
  """(summed NLL, token count) of all continuations given their contexts, under an AR model."""
  s, n = continuation_nll_rows(graphdef, params, pairs, batch_size)
  return float(s.sum()), int(n.sum())


def text_stats(samples: Sequence[Sequence[int]]) -> dict:
  """Mean per-sample unigram entropy (nats) and repeated 2-/4-gram rates."""
  ent, reps = [], {2: [], 4: []}
  for s in samples:
    if not s:
      continue
    c = np.array(list(collections.Counter(s).values()), np.float64)
    p = c / c.sum()
    ent.append(float(-(p * np.log(p)).sum()))
    for n in reps:
      grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
      if grams:
        reps[n].append(1.0 - len(set(grams)) / len(grams))
  mean = lambda x: float(np.mean(x)) if x else float("nan")
  return {"entropy": mean(ent), "rep_2": mean(reps[2]), "rep_4": mean(reps[4])}


def entropy_by_offset(samples: Sequence[Sequence[int]], k: int) -> list[float]:
  """Unigram entropy (nats) of the tokens at completion positions i with i % k == j, pooled
  over all samples, for j = 0..k-1 (offset j + 1 of every k-token block)."""
  out = []
  for j in range(k):
    c = collections.Counter(t for s in samples for t in list(s)[j::k])
    n = sum(c.values())
    out.append(float(-sum(v / n * math.log(v / n) for v in c.values())) if n else float("nan"))
  return out


def agreement(samples: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict:
  """Token-wise agreement with a reference rollout, and the mean agreeing-prefix fraction."""
  same, total, prefix = 0, 0, []
  for a, b in zip(samples, reference):
    n = min(len(a), len(b))
    eq = np.asarray(a[:n]) == np.asarray(b[:n])
    same, total = same + int(eq.sum()), total + n
    prefix.append((int(np.argmin(eq)) if not eq.all() else n) / max(n, 1))
  return {"agree": same / max(total, 1), "prefix": float(np.mean(prefix))}


# ---- per-offset metrics against the AR teacher's rollout ----


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


def offset_metrics(student_graphdef, student_params, teacher_graphdef, teacher_params,
                   tokens_BxN: np.ndarray, k: int, seed: int = 0) -> dict:
  """NLL_j / acc_j / acc_all of a PFLM window of k against AR inverse-CDF rollout targets, and
  `row_nll`, each row's mean NLL_j (a (B, k) list: for paired comparisons row by row)."""

  @jax.jit
  def run(sp, tp, tokens, z):
    teacher = model_lib.merge(teacher_graphdef, tp)
    targets, logits = rollout.ar_rollout(teacher, tokens, z, with_logits=True)
    q = jnp.exp(-losses.token_nll(logits, targets))  # the teacher's probability of each target
    nll, hit, pred = distill.window_scores(model_lib.merge(student_graphdef, sp), tokens, z,
                                           targets, with_argmax=True)
    return nll, hit, pred, targets, q

  tokens = np.asarray(tokens_BxN)
  z = np.asarray(jax.random.uniform(jax.random.key(seed), (*tokens.shape, k), jnp.float32))
  parts = []
  for idx, real in _row_chunks(len(tokens)):
    out = run(student_params, teacher_params, jnp.asarray(tokens[idx]), jnp.asarray(z[idx]))
    parts.append([np.asarray(a)[:real] for a in out])
  nll, hit, pred, tgt, q = (np.concatenate(a) for a in zip(*parts))
  loss, aux = distill.summarize_windows(jnp.asarray(nll), jnp.asarray(hit), jnp.ones(nll.shape))
  return {"nll": float(loss), **{name: float(v) for name, v in aux.items()},
          **miss_anatomy(pred.reshape(-1, k), tgt.reshape(-1, k), q.reshape(-1, k),
                         nll.reshape(-1, k)),
          "row_nll": nll.mean(1).tolist()}


# Bins of the teacher's probability of the target (= the width of its inverse-CDF bin).
Q_BINS = (0.01, 0.1)


def miss_anatomy(pred_WxK: np.ndarray, target_WxK: np.ndarray, q_WxK: np.ndarray,
                 nll_WxK: np.ndarray | None = None) -> dict:
  """Where a PFLM window misses, per offset j over W windows (pred: the student's argmax,
  target: the AR rollout's token, q: the teacher's probability of that token, nll: the
  student's NLL of it):
    q_share_j, acc_q_j  the share of targets whose bin is narrow / mid / wide (q < 0.01,
                        0.01 <= q < 0.1, q >= 0.1) and acc_j within each: z must be resolved
                        to within q to hit a bin of width q.
    acc_after_hits_j    acc_j over windows whose offsets < j were all hit (j >= 2): how well
                        the student chains when it read the earlier uniforms right.
    argmax_entropy_j,   the unigram entropy (nats) of the student's argmax tokens and of the
    target_entropy_j    targets at offset j: an argmax that falls back on frequent tokens when
                        unsure loses diversity here, with contexts and uniforms held equal.
    nll_q_j,            with nll: the student's mean NLL_j and the teacher's own -log q within
    surprisal_q_j       each bin-width bucket. A student below -log q uses z_j; one above it on
                        wide bins spreads its mass over the continuations of prefixes it could
                        not decode (the teacher, knowing the prefix, does not).
    nll_after_hits_j    with nll: NLL_j over the windows counted by acc_after_hits_j.
  """
  out = {}
  edges = (0.0, *Q_BINS, math.inf)
  for j in range(target_WxK.shape[1]):
    hit, q = pred_WxK[:, j] == target_WxK[:, j], q_WxK[:, j]
    masks = [(q >= lo) & (q < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    out[f"q_share_{j + 1}"] = [float(m.mean()) for m in masks]
    out[f"acc_q_{j + 1}"] = [float(hit[m].mean()) if m.any() else None for m in masks]
    if nll_WxK is not None:
      for name, x in (("nll_q", nll_WxK[:, j]), ("surprisal_q", -np.log(q))):
        out[f"{name}_{j + 1}"] = [float(x[m].mean()) if m.any() else None for m in masks]
    if j:
      prior = np.all(pred_WxK[:, :j] == target_WxK[:, :j], axis=1)
      out[f"acc_after_hits_{j + 1}"] = float(hit[prior].mean()) if prior.any() else None
      if nll_WxK is not None:
        out[f"nll_after_hits_{j + 1}"] = (float(nll_WxK[prior, j].mean()) if prior.any()
                                          else None)
    for name, ids in (("argmax", pred_WxK[:, j]), ("target", target_WxK[:, j])):
      p = np.bincount(ids) / len(ids)
      p = p[p > 0]
      out[f"{name}_entropy_{j + 1}"] = float(-(p * np.log(p)).sum())
  return out


def gaps_to_data_nll(row_nll_BxK, data_nll_B) -> dict:
  """gap_j: mean over rows of (row's NLL_j - the teacher's data NLL on that row), and gap_se_j,
  its standard error over rows. Pairing by row cancels the spread of the text's difficulty that
  both NLLs share. Few rows mislead: offset 4 of the 5600-step kjv_small student reads +0.02
  on 16 rows, +0.08 +- 0.06 on 64 and +0.14 +- 0.04 on all 143 validation rows."""
  d = np.asarray(row_nll_BxK, np.float64) - np.asarray(data_nll_B, np.float64)[:, None]
  se = d.std(0, ddof=1) / math.sqrt(len(d)) if len(d) > 1 else np.full(d.shape[1], np.nan)
  out = {}
  for j in range(d.shape[1]):
    out[f"gap_{j + 1}"], out[f"gap_se_{j + 1}"] = float(d[:, j].mean()), float(se[j])
  return out


def offset_floors(teacher_graphdef, teacher_params, tokens_BxN: np.ndarray, k: int,
                  samples: int = 32, seed: int = 0) -> dict:
  """Reference points for a student's NLL_j against AR rollout targets, from the teacher alone.

  blind_j   the entropy of the teacher's j-step-ahead marginal p_j(. | context): the NLL_j of a
            student that ignores z_1..z_j (the best it can do without the noise). Estimated
            from `samples` independent k-round rollouts, whose offset-j conditionals average
            to p^_j (unbiased for p_j): H(p^_j) under-estimates it (`blind_lo_j`) and
            -log p^_j(y) for y of one more independent rollout over-estimates it (`blind_j`,
            the conservative one); they meet as `samples` grows (blind_lo_1 is exact).
  prefix_j  the mean entropy of the teacher's offset-j conditional given the rollout's own
            prefix: the NLL_j of a student that decodes offsets < j exactly but ignores z_j
            (equal to blind_lo_1 at j = 1; near the teacher's data NLL).
  """

  @jax.jit
  def one(tp, tokens, z):
    ys, logits = rollout.ar_rollout(model_lib.merge(teacher_graphdef, tp), tokens, z,
                                    with_logits=True)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return ys, jnp.exp(logp), -(jnp.exp(logp) * logp).sum(-1)

  @jax.jit
  def floors(p_sum, ent_sum, y):
    p_hat = p_sum / samples
    blind = -jnp.log(jnp.take_along_axis(p_hat, y[..., None], axis=-1)[..., 0])
    blind_lo = -(p_hat * jnp.log(jnp.maximum(p_hat, 1e-30))).sum(-1)
    return {"blind": blind.sum(1), "blind_lo": blind_lo.sum(1),
            "prefix": (ent_sum / samples).sum(1)}

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
  return {f"{name}_{j + 1}": float(v / count) for name, x in sums.items() for j, v in enumerate(x)}


def data_nll_rows(graphdef, params, tokens_BxN: np.ndarray) -> np.ndarray:
  """Each row's mean NLL of its tokens 1.. under an AR model."""
  pairs = [([int(r[0])], [int(t) for t in r[1:]]) for r in tokens_BxN]
  s, n = continuation_nll_rows(graphdef, params, pairs)  # in batches of 32: bounded memory
  return s / n



# ---- held-out prompts and the whole evaluation ----


def held_out(teacher, workdir: str, n_rows: int, seq_len: int | None = None):
  """(n_rows, seq_len) validation rows of the run's own data config."""
  import ml_collections

  from kforcing_jax.config import check as config_check
  from kforcing_jax.data import pipeline

  cfg = teacher.meta.get("config")
  if not cfg:
    raise ValueError(f"the teacher checkpoint of {workdir} records no training config (a "
                     "converted checkpoint?): evaluation needs its data config for held-out prompts")
  cfg = ml_collections.ConfigDict(cfg)
  seq_len = seq_len or cfg.seq_len
  try:
    batches = pipeline.make_eval_batches(cfg.data, teacher.tokenizer, seq_len=seq_len,
                                         global_batch_size=n_rows, num_batches=1, workdir=workdir)
  except config_check.UserError as e:
    raise config_check.UserError(f"{n_rows} held-out rows asked for (prompts / validation "
                                 f"sequences), more than there are: {e}") from None
  return batches[0]




def _generate(engine, spec, prompts, seed, batch_size):
  """Completions of every prompt (row i's uniforms from (seed, i)), and for the lossless
  methods the summed acceptance counts."""
  out, counts = [], {"drafted": 0, "accepted": 0, "passes": 0}
  for lo in range(0, len(prompts), batch_size):
    batch = prompts[lo:lo + batch_size]
    res = engine.generate(batch, spec, seed, range(lo, lo + len(batch)), batch_size=batch_size)
    if isinstance(res, tuple):  # speculative.VerifiedEngine: (completions, stats)
      res, _ = res
      for c in res:
        counts["drafted"] += c.drafted
        counts["accepted"] += c.accepted
        counts["passes"] += len(c.tokens) - c.accepted  # a pass emits accepted + 1 tokens
    out += [c.tokens for c in res]
  return out, counts


def evaluate(teacher, stages: Sequence, prompts: list[list[int]], val_tokens: np.ndarray,
             max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0, evaluator=None,
             progress: Callable[[str], None] = print,
             windows: Sequence[int] | None = None,
             lossless: Sequence | None = None,
             floor_samples: int = 32,
             frequency_penalty: float = 0.0) -> tuple[list[dict], dict]:
  """Rows per (stage, k) as described above; also returns the samples per (stage, k).

  `teacher` and each of `stages` are stage_io.LoadedStage; `evaluator` an optional AR
  LoadedStage (with its tokenizer when it differs from the teacher's). `windows`: decode each
  PFLM only at these k (those <= its window); default every k = 1..window. `lossless`:
  (speculative.VerifiedEngine, VerifySpec) pairs: rows for the lossless methods, with their
  acceptance (pflm_verified's samples equal the teacher's, so agree = 1 by construction).
  `floor_samples`: rollouts behind the teacher row's blind_j / prefix_j (0: not computed),
  on the first FLOOR_ROWS validation rows.
  `frequency_penalty`: the reference code's anti-repetition option for the PFLM rows (the
  paper reports pure argmax, 0); the AR teacher row always samples without it.
  """
  from kforcing_jax.serving import speculative

  tok = teacher.tokenizer
  ar_engine = decode.Engine.from_stage(teacher)
  ar_spec = decode.DecodeSpec(k=1, max_new_tokens=max_new_tokens, ar=True)
  jobs = [(teacher, ar_engine, ar_spec)]
  for st in stages:
    engine = decode.Engine.from_stage(st)
    jobs += [(st, engine, decode.DecodeSpec(k=k, max_new_tokens=max_new_tokens,
                                            frequency_penalty=frequency_penalty))
             for k in range(1, st.k + 1) if windows is None or k in windows]
  for engine, vspec in lossless or ():
    jobs.append((engine.drafter, engine, dataclasses.replace(vspec,
                                                             max_new_tokens=max_new_tokens)))
  rows, samples = [], {}
  kmax = max([stage.k for stage in stages] or [0])
  note = metrics_log.Progress(len(jobs), progress).step
  reference = None
  for i, (st, engine, spec) in enumerate(jobs):
    t0 = time.perf_counter()
    outs, counts = _generate(engine, spec, prompts, seed, batch_size)
    gen_s = time.perf_counter() - t0
    if reference is None:
      reference = outs  # the AR teacher's own rollout: the first job
    verified = isinstance(spec, speculative.VerifySpec)
    k = spec.gamma if verified else spec.k
    method = spec.method if verified else "ar" if spec.ar else "pflm"
    s, n = continuation_nll(teacher.graphdef, teacher.params, list(zip(prompts, outs)))
    row = {"stage": st.stage, "k": k, "method": method,
           "gen_ppl": math.exp(s / n), **text_stats(outs), **agreement(outs, reference),
           "n_samples": len(outs), "gen_seconds": gen_s}
    row["entropy_by_offset"] = entropy_by_offset(outs, max(kmax, 1) if verified or spec.ar else k)
    if evaluator is not None:
      row["eval_ppl"] = _evaluator_ppl(evaluator, tok, prompts, outs)
    if verified:
      row["acceptance"] = counts["accepted"] / max(counts["drafted"], 1)
      row["tokens_per_pass"] = sum(len(o) for o in outs) / max(counts["passes"], 1)
    elif spec.ar:
      data_rows = data_nll_rows(teacher.graphdef, teacher.params, val_tokens)
      row["data_nll"] = float(data_rows.mean())  # rows of equal length: the token mean
      if kmax and floor_samples:
        # Reference points, not goals: on the first FLOOR_ROWS rows (each row costs
        # floor_samples + 1 teacher rollouts; all 128 took 5 of an evaluation's 8 minutes).
        row.update(offset_floors(teacher.graphdef, teacher.params, val_tokens[:FLOOR_ROWS], kmax,
                                 floor_samples, seed))
        row["floor_rows"] = len(val_tokens[:FLOOR_ROWS])
    else:
      row.update(offset_metrics(st.graphdef, st.params, teacher.graphdef, teacher.params,
                                val_tokens, spec.k, seed))
      row.update(gaps_to_data_nll(row.pop("row_nll"), data_rows))
    rows.append(row)
    samples[f"{method}:{st.stage}@k{k}" if verified else f"{st.stage}@k{k}"] = outs
    note(f"{method} {st.stage} k={k}: gen_ppl {row['gen_ppl']:.1f}, agree {row['agree']:.3f}")
  return rows, samples


def _evaluator_ppl(evaluator, tok, prompts, outs) -> float:
  etok = evaluator.tokenizer
  if etok is None or etok.fingerprint == tok.fingerprint:
    pairs = list(zip(prompts, outs))
  else:  # another vocabulary: score the same text re-tokenised
    strip = lambda ids: [t for t in ids if t != tok.eos_id]
    pairs = [(etok.encode_prompt(tok.decode(strip(p))), etok.encode(tok.decode(
        strip(o)))) for p, o in zip(prompts, outs)]
    pairs = [(c, t) for c, t in pairs if t]
  s, n = continuation_nll(evaluator.graphdef, evaluator.params, pairs)
  return math.exp(s / n)


def table(rows: list[dict]) -> str:
  kmax = max([r["k"] for r in rows if r["method"] == "pflm"] or [0])
  cols = ["gen_ppl"] + (["eval_ppl"] if any("eval_ppl" in r for r in rows) else []) + [
      "entropy", "rep_2", "rep_4", "agree", "prefix"] + [f"nll_{j}" for j in range(1, kmax + 1)] + [
          f"acc_{j}" for j in range(1, kmax + 1)] + ["acc_all", "data_nll"]
  if any("acceptance" in r for r in rows):
    cols += ["acceptance", "tokens_per_pass"]
  short = {"acceptance": "accept", "tokens_per_pass": "tok/pass"}
  head = f"{'method':<14}{'stage':<9}{'k':>3}" + "".join(f"{short.get(c, c):>9}" for c in cols)
  lines = [head, "-" * len(head)]
  for r in rows:
    cells = "".join(f"{r[c]:>9.3f}" if c in r else f"{'-':>9}" for c in cols)
    lines.append(f"{r.get('method', ''):<14}{r['stage']:<9}{r['k']:>3}" + cells)
  # The teacher row's reference points for nll_j, in the nll_j columns.
  for r in rows:
    for name, label in (("blind", "z-blind"), ("prefix", "prefix-known")):
      if f"{name}_1" in r:
        ref = {c: r.get(c.replace("nll", name, 1)) for c in cols if c.startswith("nll_")}
        cells = "".join(f"{ref[c]:>9.3f}" if ref.get(c) is not None else f"{'-':>9}"
                        for c in cols)
        lines.append(f"{label:<14}{r['stage']:<9}{'':>3}" + cells)
  # Each stage's full window: NLL_j - data NLL paired by row, and its standard error.
  full = {}
  for r in rows:
    if r.get("method") == "pflm" and "gap_1" in r and r["k"] >= full.get(r["stage"], r)["k"]:
      full[r["stage"]] = r
  for r in full.values():
    for name, label, fmt in (("gap", "gap to data", "+9.3f"), ("gap_se", "  s.e.", "9.3f")):
      cells = "".join(f"{r[c.replace('nll', name, 1)]:>{fmt}}" if c.startswith("nll_") and
                      c.replace("nll", name, 1) in r else f"{'':>9}" for c in cols)
      lines.append(f"{label:<14}{r['stage']:<9}{r['k']:>3}" + cells)
  return "\n".join(lines)


def miss_table(rows: list[dict]) -> str:
  """`miss_anatomy` of each stage's full window, one line per offset ('' when no PFLM row)."""
  full = {}
  for r in rows:
    if r.get("method") == "pflm" and "q_share_1" in r and r["k"] >= full.get(r["stage"], r)["k"]:
      full[r["stage"]] = r
  if not full:
    return ""
  fmt = lambda v: f"{v:>8.3f}" if v is not None else f"{'-':>8}"
  head = (f"{'stage':<9}{'j':>3}{'acc_j':>8}{'after':>8} | {'share of targets by q(y_j)':^26} |"
          f" {'acc_j by q(y_j)':^26} | {'entropy argmax/target':>21}")
  sub = (f"{'':<9}{'':>3}{'':>8}{'hits':>8} | {'<.01':>8}{'.01-.1':>9}{'>=.1':>9} |"
         f" {'<.01':>8}{'.01-.1':>9}{'>=.1':>9} |")
  lines = ["where each stage's full window misses (validation windows, AR targets):", head, sub]
  for r in full.values():
    for j in range(1, r["k"] + 1):
      lines.append(f"{r['stage']:<9}{j:>3}{fmt(r[f'acc_{j}'])}"
                   f"{fmt(r.get(f'acc_after_hits_{j}'))} |"
                   + " ".join(map(fmt, r[f"q_share_{j}"])) + " |"
                   + " ".join(map(fmt, r[f"acc_q_{j}"])) + " |"
                   + f"{r[f'argmax_entropy_{j}']:>11.2f} / {r[f'target_entropy_{j}']:.2f}")
  if all("nll_q_1" in r for r in full.values()):
    pair = lambda a, b: f"{'-':>13}" if a is None else f"{a:>6.2f} /{b:>5.2f}"
    lines += ["the student's NLL_j against the teacher's own -log q(y_j) (a student that knows the "
              "prefix and ignores z_j scores the latter):",
              f"{'stage':<9}{'j':>3}{'after hits':>12} | {'<.01':>13} {'.01-.1':>13} "
              f"{'>=.1':>13}"]
    for r in full.values():
      for j in range(1, r["k"] + 1):
        after = r.get(f"nll_after_hits_{j}")
        lines.append(f"{r['stage']:<9}{j:>3}{fmt(after):>12} | " + " ".join(
            pair(a, b) for a, b in zip(r[f"nll_q_{j}"], r[f"surprisal_q_{j}"])))
  return "\n".join(lines)
