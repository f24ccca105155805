"""Decode speed benchmark: AR baseline vs PFLM(k) vs the lossless methods, in one run.

  python -m kforcing_jax.benchmark --workdir runs/kjv_tiny --batch_sizes 1,4,16,64,256 \
      --k 1,2,3,4 --out bench.json
  python -m kforcing_jax.benchmark --workdir runs/kjv_tiny \
      --methods ar,pflm,pflm_verified,spec,spec_dynamic --k 4 --batch_sizes 1,4,16,64,256

--temperature/--top_k/--top_p/--min_p: the sampling controls, as for generate (the PFLM rows
take the temperature only). --methods (default ar,ar_stepwise,pflm): ar is always measured (the baseline); pflm_verified
(the PFLM stage drafts k tokens per teacher pass, for each --k) and spec / spec_dynamic (the
"draft" stage drafts --gamma tokens) are lossless: see kforcing_jax/serving/speculative.py. Their
rows carry tokens_per_pass (tokens a row gains per teacher forward pass) and the acceptance
rate. Prompts are --prompt_len tokens of held-out text of the run's own data (random ids for a
converted checkpoint, which records no data config, or with --prompts=random).

Loads the AR teacher and a PFLM stage (default: the largest trained window; every --k must be
<= it), then measures tokens/s, speedup over AR, time to first token and the measured roofline
bound k * t(1-token step) / t(2k-position step) per k and batch size (see
kforcing_jax/bench/decode_speed.py for the method). Prints a table; writes the JSON
({"provenance", "machine", "settings", "complete", "rows"}; rewritten after each batch size)
and a PNG of speedup vs batch size next to it (same name, .png). Speed does not depend on the
weights:
--untrained_pflm measures a PFLM made of the teacher's weights plus a fresh noise encoder when
no PFLM stage exists yet. --methods ...,mdlm adds the masked-diffusion stage ('mdlm') at every
--k (K tokens committed per pass by --mdlm_commit, in blocks of --mdlm_block).
"""

import dataclasses
import os

from absl import flags

from kforcing_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir of a training run.")
_STAGE = flags.DEFINE_string("stage", "", "PFLM stage k<n> ('' = the largest window found).")
_BATCH = flags.DEFINE_string("batch_sizes", "1,4,16,64,256", "Comma-separated batch sizes.")
_K = flags.DEFINE_string("k", "1,2,3,4", "Comma-separated PFLM windows to decode with.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (random ids).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Fixed completion length.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per point (median; >= 5 for reports).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of prompts and uniform streams.")
_METHODS = flags.DEFINE_list("methods", ["ar", "ar_stepwise", "pflm"],
                             "Decode methods: ar, ar_stepwise, pflm, pflm_verified, spec, "
                             "spec_dynamic, mdlm (ar is always included).")
_MDLM_COMMIT = flags.DEFINE_enum("mdlm_commit", "confidence", ["confidence", "greedy", "random"],
                                 "mdlm: which K masked positions a pass commits.")
_MDLM_BLOCK = flags.DEFINE_integer("mdlm_block", 0, "mdlm: semi-autoregressive block length "
                                   "(0 = none).")
_GAMMA = flags.DEFINE_integer("gamma", 4, "spec/spec_dynamic: draft tokens per teacher pass.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.4, "spec_dynamic: stop drafting below this "
                                 "draft probability.")
_PROMPTS = flags.DEFINE_enum("prompts", "auto", ["auto", "val", "random"],
                             "Prompt source: held-out text (val), random ids, or auto (val "
                             "when the run recorded its data config).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature of every method "
                                  "(0 = greedy; a PFLM stage only at its trained ones).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "AR / lossless: top-k sampling (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "AR / lossless: nucleus mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "AR / lossless: min-p (0 = off).")
_UNTRAINED = flags.DEFINE_bool("untrained_pflm", False,
                               "No PFLM stage needed: teacher weights + a fresh noise encoder.")
_OUT = flags.DEFINE_string("out", "bench.json", "Output JSON (a PNG is written beside it).")
flags.mark_flags_as_required(["workdir"])


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
  if any(v < 1 for v in vals):
    raise ValueError(f"--{name} values must be >= 1, got {text!r}")
  return vals


def untrained_pflm(teacher):
  """A PFLM engine from the teacher's weights plus a fresh noise encoder (speed only)."""
  import jax
  from flax import nnx
  from kforcing_jax.serving import decode
  from kforcing_jax.parallel import sharding
  from kforcing_jax.model import transformer as model_lib
  from kforcing_jax.model import pflm as pflm_lib

  k = max(_ints(_K.value, "k"))
  with nnx.use_eager_sharding(False):
    graphdef, fresh = model_lib.split_params(pflm_lib.PFLM(teacher.model_cfg, nnx.Rngs(0)))
  abstract = pflm_lib.abstract_pflm(teacher.model_cfg)
  params = jax.device_put(pflm_lib.init_from(teacher.params, fresh),
                          sharding.param_shardings(abstract, teacher.mesh, fsdp=False))
  return decode.Engine(graphdef, params, teacher.model_cfg, k, teacher.mesh), f"untrained k{k}"


def main(argv):
  del argv
  from kforcing_jax.serving import decode, methods as methods_lib, quality
  from kforcing_jax.observe import metrics_log, report
  from kforcing_jax.training import stage_io
  from kforcing_jax.bench import decode_speed

  metrics_log.configure_logging()
  log = metrics_log.log
  from kforcing_jax.distill import sampling
  batch_sizes, ks = _ints(_BATCH.value, "batch_sizes"), _ints(_K.value, "k")
  controls = sampling.Controls(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
  sampling.check_controls(*dataclasses.astuple(controls))
  methods = [m.strip() for m in _METHODS.value if m.strip()]
  unknown = sorted(set(methods) - set(decode_speed.METHODS))
  if unknown:
    raise ValueError(f"--methods: unknown {unknown}; choose from {list(decode_speed.METHODS)}")
  workdir = _WORKDIR.value
  teacher = stage_io.load_stage(workdir, "teacher", load_tokenizer=_PROMPTS.value != "random")
  ar = decode.Engine.from_stage(teacher)
  needs_pflm = "pflm" in methods or "pflm_verified" in methods
  pflm, pflm_stage = None, ""
  if needs_pflm and _UNTRAINED.value:
    pflm, pflm_stage = untrained_pflm(teacher)
  elif needs_pflm:
    stage = _STAGE.value or methods_lib.default_pflm_stage(workdir)
    if not stage:
      raise FileNotFoundError(f"{workdir} has no PFLM stage yet (found "
                              f"{methods_lib.pflm_stages(workdir) or 'none'}); "
                              "finish a distillation stage or pass --untrained_pflm")
    pflm_loaded = stage_io.load_stage(workdir, stage, load_tokenizer=False)
    pflm = decode.Engine.from_stage(pflm_loaded)
    pflm_stage = stage
  if needs_pflm and ks and max(ks) > pflm.trained_k:
    raise ValueError(f"--k {max(ks)} exceeds the trained window of {pflm_stage} "
                     f"(k={pflm.trained_k})")
  verified = {}
  if "pflm_verified" in methods:
    drafter = (pflm_loaded if not _UNTRAINED.value else stage_io.LoadedStage(
        pflm_stage, pflm.trained_k, pflm.cfg, pflm.graphdef, pflm.params, None, 0, {},
        pflm.mesh))
    verified["pflm_verified"] = methods_lib.verified_engine(teacher, "pflm_verified", drafter)
  if {"spec", "spec_dynamic"} & set(methods):
    if not methods_lib.has_draft(workdir):
      raise FileNotFoundError(f"--methods spec/spec_dynamic need the 'draft' stage in {workdir}; "
                              "train it with --config.stages=teacher,draft,...")
    draft = stage_io.load_stage(workdir, "draft", mesh=teacher.mesh, load_tokenizer=False)
    for m in ("spec", "spec_dynamic"):
      if m in methods:
        verified[m] = methods_lib.verified_engine(teacher, m, draft=draft)
  mdlm = None
  if methods_lib.MDLM in methods:
    if not methods_lib.has_mdlm(workdir):
      raise FileNotFoundError(f"--methods mdlm needs the 'mdlm' stage in {workdir}; train it "
                              "with --config.stages=teacher,...,mdlm")
    mdlm = methods_lib.mdlm_engine(stage_io.load_stage(workdir, methods_lib.MDLM,
                                                       mesh=teacher.mesh, load_tokenizer=False))
  pool, prompt_source = None, "random ids"
  if _PROMPTS.value != "random":
    try:
      pool = quality.held_out(teacher, workdir, 64, _PROMPT_LEN.value).tolist()
      prompt_source = "held-out text"
    except ValueError as e:
      if _PROMPTS.value == "val":
        raise
      log.info("random prompt ids (%s)", e)
  settings = {"workdir": os.path.abspath(workdir), "pflm_stage": pflm_stage, "methods": methods,
              "gamma": _GAMMA.value, "confidence": _CONFIDENCE.value, "prompts": prompt_source,
              "mdlm_commit": _MDLM_COMMIT.value, "mdlm_block": _MDLM_BLOCK.value,
              "sampling": dataclasses.asdict(controls),
              "batch_sizes": batch_sizes, "k": ks, "prompt_len": _PROMPT_LEN.value,
              "max_new_tokens": _MAX_NEW.value, "reps": _REPS.value,
              "model_config": teacher.meta.get("model_config"),
              "mesh": dict(teacher.mesh.shape)}
  log.info("benchmark: %s (PFLM stage %s), batch sizes %s, k %s, %d+%d tokens (%s), %d reps",
           ",".join(methods), pflm_stage or "-", batch_sizes, ks, _PROMPT_LEN.value,
           _MAX_NEW.value, prompt_source, _REPS.value)
  out = os.path.abspath(_OUT.value)

  def save(rows, complete):
    """Rewritten after every batch size, so a long run that is stopped keeps what it measured."""
    report.write_result(out, {"machine": decode_speed.machine(), "settings": settings,
                              "complete": complete, "rows": rows})

  rows = decode_speed.measure(ar, pflm, batch_sizes, ks, _PROMPT_LEN.value, _MAX_NEW.value,
                              _REPS.value, _SEED.value, "ar_stepwise" in methods,
                              progress=log.info, on_batch=lambda rows: save(rows, False),
                              pflm="pflm" in methods, verified=verified, gamma=_GAMMA.value,
                              confidence=_CONFIDENCE.value, prompt_pool=pool,
                              controls=controls, mdlm_engine=mdlm,
                              mdlm_commit=_MDLM_COMMIT.value, mdlm_block=_MDLM_BLOCK.value)
  save(rows, True)
  machine = decode_speed.machine()
  print(decode_speed.table(rows))
  if machine["loadavg_1m_end"] and machine["loadavg_1m_end"] > (machine["cpu_count"] or 1):
    log.warning("load average %.1f > %d CPUs during the run: timings are noisy",
                machine["loadavg_1m_end"], machine["cpu_count"])
  png = os.path.splitext(out)[0] + ".png"
  decode_speed.plot(rows, png, f"{machine['device_kind']}: decode speedup over AR "
                    f"({_PROMPT_LEN.value}+{_MAX_NEW.value} tokens)")
  log.info("wrote %s and %s", out, png)


if __name__ == "__main__":
  cli.run(main)
