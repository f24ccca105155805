"""Decode speed benchmark: AR baseline vs PFLM(k) for the same model, in one run.

  python -m kforcing_jax.benchmark --workdir runs/kjv_tiny --batch_sizes 1,4,16,64,256 \
      --k 1,2,3,4 --out bench.json

Loads the AR teacher and a PFLM stage (default: the largest trained window; every --k must be
<= it), then measures tokens/s, speedup over AR, time to first token and the measured roofline
bound k * t(1-token step) / t(2k-position step) per k and batch size (see
kforcing_jax/bench/decode_speed.py for the method). Prints a table; writes the JSON
({"machine", "settings", "complete", "rows"}; rewritten after each batch size) and a PNG of
speedup vs batch size next to it (same name, .png). Speed does not depend on the weights:
--untrained_pflm measures a PFLM made of the teacher's weights plus a fresh noise encoder when
no PFLM stage exists yet.
"""

import json
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
_STEPWISE = flags.DEFINE_bool("stepwise", True, "Also time the per-step Python-loop AR.")
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
  from kforcing_jax import decode, sharding
  from kforcing_jax import model as model_lib
  from kforcing_jax import pflm as pflm_lib

  k = max(_ints(_K.value, "k"))
  with nnx.use_eager_sharding(False):
    graphdef, fresh = model_lib.split_params(pflm_lib.PFLM(teacher.model_cfg, nnx.Rngs(0)))
  abstract = pflm_lib.abstract_pflm(teacher.model_cfg)
  params = jax.device_put(pflm_lib.init_from(teacher.params, fresh),
                          sharding.param_shardings(abstract, teacher.mesh, fsdp=False))
  return decode.Engine(graphdef, params, teacher.model_cfg, k, teacher.mesh), f"untrained k{k}"


def main(argv):
  del argv
  from kforcing_jax import decode, metrics_log, stage_io
  from kforcing_jax.bench import decode_speed

  metrics_log.configure_logging()
  log = metrics_log.log
  batch_sizes, ks = _ints(_BATCH.value, "batch_sizes"), _ints(_K.value, "k")
  workdir = _WORKDIR.value
  teacher = stage_io.load_stage(workdir, "teacher", load_tokenizer=False)
  ar = decode.Engine.from_stage(teacher)
  if _UNTRAINED.value:
    pflm, pflm_stage = untrained_pflm(teacher)
  else:
    stages = [s for s in stage_io.list_stages(workdir) if s != "teacher"]
    stage = _STAGE.value or (stages[-1] if stages else "")
    if not stage:
      raise FileNotFoundError(f"{workdir} has no PFLM stage yet (found {stages or 'none'}); "
                              "finish a distillation stage or pass --untrained_pflm")
    pflm = decode.Engine.from_stage(stage_io.load_stage(workdir, stage, load_tokenizer=False))
    pflm_stage = stage
  if ks and max(ks) > pflm.trained_k:
    raise ValueError(f"--k {max(ks)} exceeds the trained window of {pflm_stage} "
                     f"(k={pflm.trained_k})")
  settings = {"workdir": os.path.abspath(workdir), "pflm_stage": pflm_stage,
              "batch_sizes": batch_sizes, "k": ks, "prompt_len": _PROMPT_LEN.value,
              "max_new_tokens": _MAX_NEW.value, "reps": _REPS.value,
              "model_config": teacher.meta.get("model_config"),
              "mesh": dict(teacher.mesh.shape)}
  log.info("benchmark: AR teacher vs %s, batch sizes %s, k %s, %d+%d tokens, %d reps",
           pflm_stage, batch_sizes, ks, _PROMPT_LEN.value, _MAX_NEW.value, _REPS.value)
  out = os.path.abspath(_OUT.value)
  os.makedirs(os.path.dirname(out), exist_ok=True)

  def save(rows, complete):
    """Rewritten after every batch size, so a long run that is stopped keeps what it measured."""
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"machine": decode_speed.machine(), "settings": settings, "complete": complete,
                 "rows": rows}, f, indent=1)
    os.replace(tmp, out)

  rows = decode_speed.measure(ar, pflm, batch_sizes, ks, _PROMPT_LEN.value, _MAX_NEW.value,
                              _REPS.value, _SEED.value, _STEPWISE.value, progress=log.info,
                              on_batch=lambda rows: save(rows, False))
  save(rows, True)
  machine = decode_speed.machine()
  print(decode_speed.table(rows))
  if machine["loadavg_1m_end"] and machine["loadavg_1m_end"] > (machine["cpu_count"] or 1):
    log.warning("load average %.1f > %d CPUs during the run: timings are noisy",
                machine["loadavg_1m_end"], machine["cpu_count"])
  png = os.path.splitext(out)[0] + ".png"
  decode_speed.plot(rows, png, f"{machine['device_kind']}: PFLM vs AR decode "
                    f"({_PROMPT_LEN.value}+{_MAX_NEW.value} tokens)")
  log.info("wrote %s and %s", out, png)


if __name__ == "__main__":
  cli.run(main)
