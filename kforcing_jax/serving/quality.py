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

This module runs the evaluation (held-out prompts, every decode method, the tables); the pure
metrics are in quality_metrics.py and the model scoring (a Scorer owning its compiled
functions) in scorer.py.
"""

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np

from kforcing_jax.distill import sampling
from kforcing_jax.observe import metrics_log, report
from kforcing_jax.serving import decode, methods, speculative
from kforcing_jax.serving import quality_metrics as qm
from kforcing_jax.serving import scorer as scorer_lib


# ---- held-out prompts and the whole evaluation ----


def held_out(teacher, workdir: str, n_rows: int, seq_len: int | None = None, stages=()):
  """(n_rows, seq_len) validation rows of the run's own data config: the teacher's, or for an
  imported teacher (which records none) that of the first of `stages` trained here."""
  import ml_collections

  from kforcing_jax.config import check as config_check
  from kforcing_jax.data import pipeline

  cfg = next((st.meta["config"] for st in (teacher, *stages) if st.meta.get("config")), None)
  if not cfg:
    raise config_check.UserError(
        f"no stage of {workdir} evaluated here records a training config (only converted "
        "checkpoints?): evaluation needs a data config for held-out prompts; distil a stage "
        "first")
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
             frequency_penalty: float = 0.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, mdlm: Sequence | None = None) -> tuple[list[dict], dict]:
  """Rows per (stage, k) as described above; also returns the samples per (stage, k).

  `teacher` and each of `stages` are stage_io.LoadedStage; `evaluator` an optional AR
  LoadedStage (with its tokenizer when it differs from the teacher's). `windows`: decode each
  PFLM only at these k (those <= its window); default every k = 1..window. `lossless`:
  (speculative.VerifiedEngine, VerifySpec) pairs: rows for the lossless methods, with their
  acceptance (pflm_verified's samples equal the teacher's, so agree = 1 by construction).
  `floor_samples`: rollouts behind the teacher row's blind_j / prefix_j (0: not computed),
  on the first scorer.FLOOR_ROWS validation rows.
  `frequency_penalty`: the reference code's anti-repetition option for the PFLM rows (the
  paper reports pure argmax, 0); the AR teacher row always samples without it.
  `temperature`: every row samples at it (the AR teacher's logits / temperature; a PFLM's
  noise encoder is told it, and a stage not trained at it is skipped) and NLL_j is scored
  against AR targets made at it; Gen-PPL is always under the teacher at temperature 1.
  `top_k`, `top_p`, `min_p`: filters of the AR row (and of the lossless rows' specs, which the
  caller builds); a PFLM takes none, so with a filter on the PFLM rows are skipped.
  `mdlm`: (LoadedStage, serving.mdlm.MdlmEngine, MdlmDecodeSpec) triples: rows of the masked-
  diffusion stage (method 'mdlm', with its commit rule and block; no per-offset metrics).
  """
  filters = dict(top_k=top_k, top_p=top_p, min_p=min_p)
  filtered = bool(sampling.active_filters(top_k, top_p, min_p))
  scorer = scorer_lib.Scorer()
  tok = teacher.tokenizer
  ar_engine = decode.Engine.from_stage(teacher)
  ar_spec = decode.DecodeSpec(k=1, max_new_tokens=max_new_tokens, ar=True, tau=temperature,
                              **filters)
  jobs = [(teacher, ar_engine, ar_spec)]
  for st in stages:
    if filtered:
      progress(f"{st.stage}: skipped (a PFLM samples through its noise: no top_k / top_p / "
               "min_p)")
      continue
    if not st.temperatures.allows(temperature):
      progress(f"{st.stage}: skipped at temperature {temperature:g} (trained at "
               f"{st.temperatures})")
      continue
    engine = decode.Engine.from_stage(st)
    jobs += [(st, engine, decode.DecodeSpec(k=k, max_new_tokens=max_new_tokens,
                                            frequency_penalty=frequency_penalty, tau=temperature))
             for k in range(1, st.k + 1) if windows is None or k in windows]
  for engine, vspec in lossless or ():
    jobs.append((engine.drafter, engine, dataclasses.replace(vspec,
                                                             max_new_tokens=max_new_tokens)))
  jobs += [(st, engine, dataclasses.replace(mspec, max_new_tokens=max_new_tokens))
           for st, engine, mspec in mdlm or ()]
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
    k, method = methods.window(spec), methods.name(spec)
    is_mdlm = method == methods.MDLM
    s, n = scorer.continuation_nll(teacher.graphdef, teacher.params, list(zip(prompts, outs)))
    row = {"stage": st.stage, "k": k, "method": method, "temperature": temperature,
           **({c: v for c, v in filters.items()} if filtered else {}),
           "gen_ppl": math.exp(s / n), **qm.text_stats(outs), **qm.agreement(outs, reference),
           "n_samples": len(outs), "gen_seconds": gen_s}
    if is_mdlm:
      row.update(commit=spec.commit, block=spec.block, rerank=spec.rerank)
    row["entropy_by_offset"] = qm.entropy_by_offset(
        outs, max(kmax, 1) if verified or is_mdlm or spec.ar else k)
    if evaluator is not None:
      row["eval_ppl"] = _evaluator_ppl(scorer, evaluator, tok, prompts, outs)
    if verified:
      row["acceptance"] = counts["accepted"] / max(counts["drafted"], 1)
      row["tokens_per_pass"] = sum(len(o) for o in outs) / max(counts["passes"], 1)
    elif is_mdlm:
      row["tokens_per_pass"] = float(k)
    elif spec.ar:
      data_rows = scorer.data_nll_rows(teacher.graphdef, teacher.params, val_tokens)
      row["data_nll"] = float(data_rows.mean())  # rows of equal length: the token mean
      if kmax and floor_samples and temperature == 1:
        # Reference points, not goals: on the first FLOOR_ROWS rows (each row costs
        # floor_samples + 1 teacher rollouts; all 128 took 5 of an evaluation's 8 minutes).
        floor_tokens = val_tokens[:scorer_lib.FLOOR_ROWS]
        row.update(scorer.offset_floors(teacher.graphdef, teacher.params, floor_tokens, kmax,
                                        floor_samples, seed))
        row["floor_rows"] = len(floor_tokens)
    else:
      row.update(scorer.offset_metrics(st.graphdef, st.params, teacher.graphdef, teacher.params,
                                       val_tokens, spec.k, seed, temperature))
      row.update(qm.gaps_to_data_nll(row.pop("row_nll"), data_rows))
    rows.append(row)
    samples[f"{method}:{st.stage}@k{k}" if verified else
            f"mdlm_{spec.commit}{'_rerank' if spec.rerank else ''}@k{k}" if is_mdlm else
            f"{st.stage}@k{k}"] = outs
    note(f"{method} {st.stage} k={k}: gen_ppl {row['gen_ppl']:.1f}, agree {row['agree']:.3f}")
  return rows, samples


def _evaluator_ppl(scorer, evaluator, tok, prompts, outs) -> float:
  etok = evaluator.tokenizer
  if etok is None or etok.fingerprint == tok.fingerprint:
    pairs = list(zip(prompts, outs))
  else:  # another vocabulary: score the same text re-tokenised
    strip = lambda ids: [t for t in ids if t != tok.eos_id]
    pairs = [(etok.encode_prompt(tok.decode(strip(p))), etok.encode(tok.decode(
        strip(o)))) for p, o in zip(prompts, outs)]
    pairs = [(c, t) for c, t in pairs if t]
  s, n = scorer.continuation_nll(evaluator.graphdef, evaluator.params, pairs)
  return math.exp(s / n)


def _full_windows(rows: list[dict], field: str) -> dict:
  """{stage: its PFLM row of the largest k} among the rows that carry `field`."""
  full = {}
  for r in rows:
    if r.get("method") == "pflm" and field in r and r["k"] >= full.get(r["stage"], r)["k"]:
      full[r["stage"]] = r
  return full


def table(rows: list[dict]) -> str:
  kmax = max([r["k"] for r in rows if r["method"] == "pflm"] or [0])
  cols = ["gen_ppl"] + (["eval_ppl"] if any("eval_ppl" in r for r in rows) else []) + [
      "entropy", "rep_2", "rep_4", "agree", "prefix"] + [f"nll_{j}" for j in range(1, kmax + 1)] + [
          f"acc_{j}" for j in range(1, kmax + 1)] + ["acc_all", "data_nll"]
  if any("acceptance" in r for r in rows):
    cols += ["acceptance", "tokens_per_pass"]
  short = {"acceptance": "accept", "tokens_per_pass": "tok/pass"}
  columns = [("method", "<14"), ("stage", "<9"), ("k", ">3")] + [
      (short.get(c, c), ">9.3f") for c in cols]
  short_commit = {"confidence": "conf"}
  label = lambda r: r.get("method", "") + (
      f":{short_commit.get(r['commit'], r['commit'])}" if "commit" in r else "") + (
      "+ra" if r.get("rerank") else "")
  lines = [report.text_table(columns, ([label(r), r["stage"], r["k"]]
                                       + [r.get(c, "-") for c in cols] for r in rows))]
  # The teacher row's reference points for nll_j, in the nll_j columns.
  for r in rows:
    for name, label in (("blind", "z-blind"), ("prefix", "prefix-known")):
      if f"{name}_1" in r:
        ref = {c: r.get(c.replace("nll", name, 1)) for c in cols if c.startswith("nll_")}
        cells = [ref[c] if ref.get(c) is not None else "-" for c in cols]
        lines.append(report.text_row(columns, [label, r["stage"], ""] + cells))
  # Each stage's full window: NLL_j - data NLL paired by row, and its standard error.
  for r in _full_windows(rows, "gap_1").values():
    for name, label, fmt in (("gap", "gap to data", "+.3f"), ("gap_se", "  s.e.", ".3f")):
      key = lambda c: c.replace("nll", name, 1)
      cells = [f"{r[key(c)]:{fmt}}" if c.startswith("nll_") and key(c) in r else ""
               for c in cols]
      lines.append(report.text_row(columns, [label, r["stage"], r["k"]] + cells))
  return "\n".join(lines)


def miss_table(rows: list[dict]) -> str:
  """`miss_anatomy` of each stage's full window, one line per offset ('' when no PFLM row)."""
  full = _full_windows(rows, "q_share_1")
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


# ---- the Gen-PPL / entropy frontier over temperatures ----


def frontier(rows: list[dict]) -> list[dict]:
  """One point per (model, temperature): the teacher and each stage's full window, with
  `ppl_at_entropy`, its Gen-PPL over the teacher's at the same entropy (the teacher's curve,
  log Gen-PPL linear in entropy between its temperatures; None outside its entropy range).
  Below 1 the student writes more likely text at that diversity; above 1, less likely."""
  full = {}
  for r in rows:
    key = (r["stage"], r["temperature"])
    if r["method"] in ("ar", "pflm") and r["k"] >= full.get(key, r)["k"]:
      full[key] = r
  points = sorted(full.values(), key=lambda r: (r["stage"] != "teacher", r["stage"],
                                                r["temperature"]))
  ref = sorted((r["entropy"], math.log(r["gen_ppl"])) for r in points if r["method"] == "ar")
  out = []
  for r in points:
    p = {c: r.get(c) for c in ("stage", "k", "method", "temperature", "gen_ppl", "entropy",
                               "rep_2", "rep_4")}
    p.update({c: r[c] for c in r if c.startswith("nll_") and c[4:].isdigit()})
    p["ppl_at_entropy"] = None
    if r["method"] == "pflm" and len(ref) >= 2 and ref[0][0] <= r["entropy"] <= ref[-1][0]:
      at = float(np.interp(r["entropy"], [e for e, _ in ref], [lp for _, lp in ref]))
      p["ppl_at_entropy"] = r["gen_ppl"] / math.exp(at)
    out.append(p)
  return out


def frontier_table(points: list[dict]) -> str:
  kmax = max([p["k"] for p in points if p["method"] == "pflm"] or [0])
  cols = ["gen_ppl", "entropy", "rep_2", "rep_4", "ppl_at_entropy"] + [
      f"nll_{j}" for j in range(1, kmax + 1)]
  columns = [("stage", "<9"), ("k", ">3"), ("temp", ">6.2f")] + [
      ({"ppl_at_entropy": "ppl@H"}.get(c, c), ">9.3f") for c in cols]
  return report.text_table(columns, ([p["stage"], p["k"], p["temperature"]] +
                                     [p.get(c) if p.get(c) is not None else "-" for c in cols]
                                     for p in points))


def plot_frontier(points: list[dict], out_png: str, title: str = "") -> None:
  """Gen-PPL against unigram entropy, one curve per model, labelled by temperature."""
  with report.figure(out_png) as (_, _, ax):
    for i, stage in enumerate(dict.fromkeys(p["stage"] for p in points)):
      ps = sorted((p for p in points if p["stage"] == stage), key=lambda p: p["temperature"])
      label = "AR teacher" if stage == "teacher" else f"{stage} (k={ps[0]['k']})"
      ax.plot([p["entropy"] for p in ps], [p["gen_ppl"] for p in ps], "o-", color=f"C{i}",
              label=label)
      for p in ps:
        ax.annotate(f"{p['temperature']:g}", (p["entropy"], p["gen_ppl"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    ax.set_yscale("log")
    report.finish_axes(ax, "unigram entropy of a sample (nats)",
                       "Gen-PPL under the teacher (log)", title)
