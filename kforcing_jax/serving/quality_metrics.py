"""Sample-quality metrics of token lists and of per-offset scores: pure numpy, no model.

Their meaning within an evaluation is described in quality.py (the runner).
"""

import collections
import math
from typing import Sequence

import numpy as np


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
