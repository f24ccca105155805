"""Quality evaluation of the AR teacher and every PFLM stage at k = 1..k_max.

  python -m kforcing_jax.evaluate --workdir runs/kjv_tiny --out eval.json \
      [--num_prompts 64 --prompt_len 32 --max_new_tokens 64] \
      [--evaluator_workdir OTHER_RUN --evaluator_stage teacher] [--temperatures 0.6,0.8,1,1.2]

Held-out prompts are the first --prompt_len tokens of validation rows of the run's own data
config (read from the teacher checkpoint's meta), each prefixed with the end-of-document id.
Metrics (Gen-PPL by the teacher and optionally another AR checkpoint, unigram entropy, repeated
n-gram rates, agreement with the AR teacher's rollout under identical uniforms, per-offset
NLL_j / acc_j / acc_all against AR rollout targets) are defined in kforcing_jax/serving/quality.py.
The lossless methods (--lossless, default on) add rows with their acceptance rate and tokens
per teacher pass; pflm_verified's samples are the teacher's own (agree = 1 by construction).
Prints a table, then where each stage's full window misses and what its NLL_j is made of
(`quality_metrics.miss_anatomy`: by the width of the target's inverse-CDF bin); writes
JSON {"provenance", "settings", "rows", "samples"} (samples as text, a few per row).

--temperatures scores the teacher and every PFLM stage trained at each temperature (a stage is
skipped at temperatures outside its trained range): samples, Gen-PPL under the teacher at
temperature 1, entropy, rep_n, and NLL_j against AR targets made at that temperature. It adds
the Gen-PPL / entropy frontier: a table with each stage's Gen-PPL over the teacher's at equal
entropy (`ppl@H`), "frontier" in the JSON, and a PNG beside --out. The lossless rows and the
NLL_j reference points are computed at temperature 1 only. --top_k / --top_p / --min_p filter
the teacher's and the lossless rows' sampling (a PFLM takes no filter: its rows are skipped).

When the run has the masked-diffusion stage ('mdlm'), rows 'mdlm' decode it at each --mdlm_k
(K tokens per pass) with each --mdlm_commits rule, in blocks of --mdlm_block, at every
temperature (and filter): Gen-PPL, entropy, rep_n, agreement; no per-offset NLL (it has no
noise; its NLL bound is the stage's val_loss in metrics.jsonl).
"""

import os

from absl import flags

from kforcing_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir of a training run.")
_OUT = flags.DEFINE_string("out", "eval.json", "Output JSON.")
_STAGES = flags.DEFINE_string("stages", "", "Comma-separated PFLM stages ('' = all found).")
_NUM = flags.DEFINE_integer("num_prompts", 64, "Held-out prompts.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens taken from each row.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Completion length (fixed; no EOS stop).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Generation batch size.")
_VAL_SEQS = flags.DEFINE_integer(
    "val_seqs", 128, "Validation sequences for the per-offset metrics. The table prints the "
    "standard error of NLL_j - data NLL: ~0.06 nats at 64 rows, ~0.04 at 128 (kjv_small).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the uniform streams.")
_EVAL_DIR = flags.DEFINE_string("evaluator_workdir", "", "Another run scoring Gen-PPL too.")
_EVAL_STAGE = flags.DEFINE_string("evaluator_stage", "teacher", "Its AR stage.")
_SHOW = flags.DEFINE_integer("show_samples", 3, "Sample texts stored per row.")
_LOSSLESS = flags.DEFINE_bool("lossless", True, "Also rows for the lossless methods: "
                              "pflm_verified (each PFLM stage at its k) and, when the run has "
                              "the 'draft' stage, spec and spec_dynamic.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "spec/spec_dynamic: draft tokens per teacher pass.")
_FLOOR = flags.DEFINE_integer("floor_samples", 32, "Teacher rollouts behind the z-blind and "
                              "prefix-known reference points of NLL_j, on the first 32 "
                              "validation rows (0: skip them).")
_TEMPS = flags.DEFINE_list("temperatures", [], "Temperatures of the frontier ('' = 1 only).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Teacher and lossless rows: top-k (0 = off; a PFLM "
                              "takes no filter, so its rows are skipped).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "As --top_k, nucleus mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "As --top_k, min-p (0 = off).")
_MDLM_K = flags.DEFINE_list("mdlm_k", ["1", "2", "4"], "mdlm rows: tokens per pass ('' = none).")
_MDLM_COMMITS = flags.DEFINE_list("mdlm_commits", ["confidence", "greedy", "random"],
                                  "mdlm rows: commit rules (serving/mdlm.py).")
_MDLM_BLOCK = flags.DEFINE_integer("mdlm_block", 0, "mdlm rows: semi-autoregressive block "
                                   "length (0 = none).")
_MDLM_RERANK = flags.DEFINE_float("mdlm_rerank", 0.0, "mdlm rows: > 0 adds confidence rows "
                                  "with this attention-discounted reranking (serving/mdlm.py).")
_PENALTY = flags.DEFINE_float("frequency_penalty", 0.0, "PFLM rows: subtract penalty * count "
                              "from the logits before each argmax (the reference code's "
                              "option; the paper and the default report pure argmax, 0).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import numpy as np
  from kforcing_jax.observe import metrics_log, report
  from kforcing_jax.serving import methods, quality
  from kforcing_jax.training import stage_io

  metrics_log.configure_logging()
  log = metrics_log.log
  workdir = _WORKDIR.value
  teacher = stage_io.load_stage(workdir, "teacher")
  found = methods.pflm_stages(workdir)
  # The teacher is always evaluated (it is the reference row); naming it is harmless.
  names = [s for s in _STAGES.value.split(",") if s and s != "teacher"] or found
  missing = sorted(set(names) - set(found))
  if missing:
    raise FileNotFoundError(f"stages {missing} have no checkpoint in {workdir} (found {found})")
  stages = [stage_io.load_stage(workdir, s, load_tokenizer=False) for s in names]
  rows_needed = max(_NUM.value, _VAL_SEQS.value)
  val = quality.held_out(teacher, workdir, rows_needed, stages=stages)
  start = teacher.tokenizer.prompt_start
  prompts = [start + r[:_PROMPT_LEN.value - len(start)].tolist() for r in val[:_NUM.value]]
  val_tokens = np.asarray(val[:_VAL_SEQS.value])
  evaluator = None
  if _EVAL_DIR.value:
    evaluator = stage_io.load_stage(_EVAL_DIR.value, _EVAL_STAGE.value)
    if evaluator.k:
      raise ValueError(f"--evaluator_stage {_EVAL_STAGE.value} is a PFLM; Gen-PPL needs an AR model")
  log.info("evaluating teacher + %s on %d held-out prompts (%d+%d tokens)", names or "no PFLM",
           len(prompts), _PROMPT_LEN.value, _MAX_NEW.value)
  from kforcing_jax.distill import sampling
  filters = dict(top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value)
  controls = sampling.Controls(1.0, **filters)  # the lossless rows: at temperature 1
  sampling.check_controls(1.0, **filters)
  lossless = []
  if _LOSSLESS.value:
    for st in stages:
      lossless.append((methods.verified_engine(teacher, "pflm_verified", pflm=st),
                       methods.verify_spec("pflm_verified", st.k, _MAX_NEW.value,
                                           controls=controls, drafter_temps=st.temperatures)))
    if methods.has_draft(workdir):
      draft = stage_io.load_stage(workdir, "draft", mesh=teacher.mesh, load_tokenizer=False)
      for method in ("spec", "spec_dynamic"):
        lossless.append((methods.verified_engine(teacher, method, draft=draft),
                         methods.verify_spec(method, draft.k, _MAX_NEW.value,
                                             gamma=_GAMMA.value, controls=controls)))
  mdlm = mdlm_stage = None
  if methods.has_mdlm(workdir) and _MDLM_K.value:
    mdlm_stage = stage_io.load_stage(workdir, methods.MDLM, mesh=teacher.mesh,
                                     load_tokenizer=False)
    mdlm = methods.mdlm_engine(mdlm_stage)
  temps = [float(t) for t in _TEMPS.value] or [1.0]
  if any(t <= 0 for t in temps):
    raise ValueError(f"--temperatures must be > 0 (sampling temperatures), got {temps}")
  rows, samples = [], {}
  for t in temps:
    rows_t, samples_t = quality.evaluate(
        teacher, stages, prompts, val_tokens, _MAX_NEW.value, _BATCH.value, _SEED.value,
        evaluator, progress=log.info, lossless=lossless if t == 1 else None,
        floor_samples=_FLOOR.value, frequency_penalty=_PENALTY.value, temperature=t,
        mdlm=[(mdlm_stage, mdlm, methods.mdlm_spec(
            _MAX_NEW.value, int(k), commit, _MDLM_BLOCK.value, sampling.Controls(t, **filters),
            rerank=rerank)) for k in _MDLM_K.value for commit, rerank in
              [(c, 0.0) for c in _MDLM_COMMITS.value]
              + ([("confidence", _MDLM_RERANK.value)] if _MDLM_RERANK.value else [])]
        if mdlm else None,
        **filters)
    if len(temps) > 1:
      print(f"temperature {t:g}:")
      samples_t = {f"{name}@t{t:g}": outs for name, outs in samples_t.items()}
    print(quality.table(rows_t))
    print(quality.miss_table(rows_t))
    rows += rows_t
    samples.update(samples_t)
  points = None
  if len(temps) > 1:
    points = quality.frontier(rows)
    print("Gen-PPL / entropy frontier (ppl@H: Gen-PPL over the teacher's at equal entropy):")
    print(quality.frontier_table(points))
  tok = teacher.tokenizer
  shown = {name: [{"prompt": tok.decode(p[len(start):]), "completion": tok.decode(o)}
                  for p, o in zip(prompts[:_SHOW.value], outs[:_SHOW.value])]
           for name, outs in samples.items()}
  settings = {"workdir": os.path.abspath(workdir),
              "stages": ["teacher"] + names + ([methods.MDLM] if mdlm else []),
              "steps": {s.stage: s.step for s in [teacher] + stages + [mdlm_stage] if s},
              "num_prompts": len(prompts), "prompt_len": _PROMPT_LEN.value,
              "max_new_tokens": _MAX_NEW.value, "val_seqs": len(val_tokens),
              "seed": _SEED.value, "evaluator": _EVAL_DIR.value or None,
              "floor_samples": _FLOOR.value, "frequency_penalty": _PENALTY.value,
              "temperatures": temps, **filters,
              **({"mdlm_k": [int(k) for k in _MDLM_K.value], "mdlm_commits": _MDLM_COMMITS.value,
                  "mdlm_block": _MDLM_BLOCK.value, "mdlm_rerank": _MDLM_RERANK.value}
                 if mdlm else {})}
  out = os.path.abspath(_OUT.value)
  result = {"settings": settings, "rows": rows, "samples": shown}
  if points is not None:
    result["frontier"] = points
    png = os.path.splitext(out)[0] + ".png"
    quality.plot_frontier(points, png, f"{os.path.basename(os.path.normpath(workdir))}: "
                          f"temperatures {', '.join(f'{t:g}' for t in temps)}")
    log.info("wrote %s", png)
  report.write_result(out, result)
  log.info("wrote %s", out)


if __name__ == "__main__":
  cli.run(main)
