"""Generate completions with a trained stage (AR teacher or PFLM) from a JSONL file of prompts.

  python -m kforcing_jax.generate --workdir runs/kjv_tiny [--stage k4] \
      --prompts prompts.jsonl --k 4 --batch_size 64 --max_new_tokens 128 --out samples.jsonl

Each input line is {"prompt": "..."} (or {"text": ...}, or a bare JSON string). Each output line:
{"index", "prompt", "completion", "prompt_ids", "completion_ids", "finished", "stage", "k",
"method"}. The stage defaults to the last one of the chain; --k defaults to the stage's trained
window (any k' <= it works); the teacher decodes as the AR baseline (inverse-CDF sampling from
the same per-row uniform streams). Sampling: --temperature (0 = greedy; a PFLM stage only at the
temperatures it was trained at, and 0 only if trained with a greedy share), and for the teacher
and the lossless methods --top_k, --top_p, --min_p. Prompts are prefixed with the
tokenizer's end-of-document id (the training data's document separator) unless --no_bos.
Row i's uniforms come from (--seed, i), so a sample does not depend on --batch_size.

Lossless methods (the AR teacher verifies a drafter; serving/speculative.py):
  --method pflm_verified   the PFLM stage (--stage, default the last) drafts --k tokens from the
                           row's uniforms; the output is token for token the teacher's own
                           inverse-CDF decode (--stage teacher) with the same --seed
  --method spec            the "draft" stage proposes --gamma tokens (speculative sampling;
                           --temperature 0: the teacher's greedy decode)
  --method spec_dynamic    as spec, drafting stops below --confidence
Their records also carry "drafted" and "accepted".

Masked diffusion (the 'mdlm' stage, --config.stages=...,mdlm; serving/mdlm.py):
  --method mdlm            --k tokens committed per forward pass (default 4) by --commit
                           (confidence, greedy = leftmost first, random), in blocks of --block
                           (0: anywhere in the continuation); tokens sampled at --temperature;
                           --rerank > 0: confidence discounted by attention on masked positions
"""

import dataclasses
import json
import os
import time

from absl import flags

from kforcing_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir of a training run.")
_STAGE = flags.DEFINE_string("stage", "", "teacher or k<n>; '' = the last stage found.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file of prompts.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL file.")
_K = flags.DEFINE_integer("k", 0, "Tokens per step for a PFLM (0 = its trained k).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per batch (one compiled program).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the per-row uniform streams.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "AR / lossless: sample among the k likeliest (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "AR / lossless: nucleus sampling mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "AR / lossless: drop ids below min_p x the top "
                            "probability (0 = off).")
_PENALTY = flags.DEFINE_float("frequency_penalty", 0.0, "Subtract penalty * count from logits.")
_STOP = flags.DEFINE_bool("stop_at_eos", True, "Stop a row at the end-of-document token.")
_NO_BOS = flags.DEFINE_bool("no_bos", False, "Do not prefix prompts with the eos id.")
_EMA = flags.DEFINE_bool("use_ema", True, "Load the EMA weights when the checkpoint has them.")
_METHOD = flags.DEFINE_enum("method", "",
                            ["", "pflm_verified", "spec", "spec_dynamic", "mdlm"],
                            "'' = the stage's own decoding (AR, PFLM, or mdlm for the masked-"
                            "diffusion stage); else a lossless method verified by the teacher.")
_COMMIT = flags.DEFINE_enum("commit", "confidence", ["confidence", "greedy", "random"],
                            "mdlm: which K masked positions a pass commits.")
_BLOCK = flags.DEFINE_integer("block", 0, "mdlm: semi-autoregressive block length (0 = none).")
_RERANK = flags.DEFINE_float("rerank", 0.0, "mdlm, --commit=confidence: attention-discounted "
                             "reranking exponent (0 = off; serving/mdlm.py).")
_GAMMA = flags.DEFINE_integer("gamma", 4, "spec/spec_dynamic: draft tokens per teacher pass.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.4, "spec_dynamic: stop drafting below this "
                                 "draft probability.")
flags.mark_flags_as_required(["workdir", "prompts", "out"])


def read_prompts(path: str) -> list[str]:
  """Prompt strings from a JSONL file ("prompt" / "text" field, or a bare string per line)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      obj = json.loads(line)
      if isinstance(obj, str):
        out.append(obj)
      elif isinstance(obj, dict) and isinstance(obj.get("prompt", obj.get("text")), str):
        out.append(obj.get("prompt", obj.get("text")))
      else:
        raise ValueError(f"{path}:{n}: expected a JSON string or an object with a 'prompt' "
                         f"(or 'text') string, got {line.strip()[:80]!r}")
  if not out:
    raise ValueError(f"{path} holds no prompts")
  return out


def _verified_decoder(workdir, drafter, method, k, gamma, confidence, max_new_tokens, controls,
                      frequency_penalty, eos, use_ema):
  """(decode_batch, VerifySpec, method name) of a lossless method: the teacher verifies."""
  from kforcing_jax.serving import methods
  if frequency_penalty:
    raise ValueError(f"--method={method} is lossless: it reproduces the teacher, which has no "
                     "frequency penalty; drop --frequency_penalty")
  teacher = methods.load_verifier(workdir, drafter, method, use_ema)
  engine = methods.verified_engine(teacher, method, pflm=drafter, draft=drafter)
  spec = methods.verify_spec(method, drafter.k, max_new_tokens, k=k, gamma=gamma,
                             controls=controls, confidence=confidence, eos_id=eos,
                             drafter_temps=drafter.temperatures)
  engine.check(spec)
  return engine.generate, spec, method + methods.controls_label(controls)


def run(workdir: str, prompts_path: str, out_path: str, stage: str = "", k: int = 0,
        batch_size: int = 64, max_new_tokens: int = 128, seed: int = 0,
        controls=None, frequency_penalty: float = 0.0, stop_at_eos: bool = True,
        bos: bool = True, use_ema: bool = True, method: str = "", gamma: int = 4,
        confidence: float = 0.4, commit: str = "confidence", block: int = 0,
        rerank: float = 0.0) -> list[dict]:
  """Generate for every prompt of `prompts_path` under the sampling `controls`
  (`sampling.Controls`, default temperature 1); writes and returns the output records."""
  from kforcing_jax.distill import sampling
  from kforcing_jax.serving import decode, methods
  controls = controls or sampling.Controls()
  sampling.check_controls(*dataclasses.astuple(controls))
  from kforcing_jax.observe import metrics_log
  from kforcing_jax.training import stage_io

  log = metrics_log.log
  stage = stage or methods.default_stage(workdir, method)
  if not stage:
    raise FileNotFoundError(f"no checkpoints under {stage_io.stages_dir(workdir)}")
  loaded = stage_io.load_stage(workdir, stage, use_ema=use_ema)
  tok = loaded.tokenizer
  eos = tok.eos_id if stop_at_eos else None
  texts = read_prompts(prompts_path)
  ids = [tok.encode_prompt(t) if bos else tok.encode(t) for t in texts]
  if not all(ids):
    raise ValueError("an empty prompt with --no_bos has no token to condition on")
  if not method and loaded.model_cfg.attention == "bidirectional":
    method = methods.MDLM  # the masked-diffusion stage decodes only one way
  if method == methods.MDLM:
    if frequency_penalty:
      raise ValueError("--method=mdlm has no frequency penalty; drop --frequency_penalty")
    engine = methods.mdlm_engine(loaded)
    spec = methods.mdlm_spec(max_new_tokens, k or 4, commit, block, controls, eos, rerank)
    engine.check(spec)
    method = f"mdlm_{commit}" + methods.controls_label(controls)
    decode_batch = lambda *a, **kw: (engine.generate(*a, **kw), None)
  elif method:
    decode_batch, spec, method = _verified_decoder(workdir, loaded, method, k, gamma, confidence,
                                                   max_new_tokens, controls, frequency_penalty,
                                                   eos, use_ema)
  else:
    spec = methods.decode_spec(loaded.k, max_new_tokens, k, controls, frequency_penalty, eos)
    engine = decode.Engine.from_stage(loaded)
    engine.check(spec)
    method = methods.name(spec) + methods.controls_label(controls)
    decode_batch = lambda *a, **kw: (engine.generate(*a, **kw), None)
  k_out = methods.window(spec)
  log.info("stage %s (step %d, trained k=%d): %s decoding, k=%d, %d prompts, batch %d, "
           "%d new tokens", stage, loaded.step, loaded.k, method, k_out, len(ids), batch_size,
           max_new_tokens)
  records, t0, n_tokens = [], time.perf_counter(), 0
  plen = decode.bucket_len(max(len(p) for p in ids))  # one prompt bucket for the whole file
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  note = metrics_log.Progress(-(-len(ids) // batch_size)).step
  with open(out_path, "w", encoding="utf-8") as f:
    for lo in range(0, len(ids), batch_size):
      batch = ids[lo:lo + batch_size]
      outs, stats = decode_batch(batch, spec, seed=seed, row_ids=range(lo, lo + len(batch)),
                                 batch_size=batch_size, prompt_len=plen)
      for i, (p, c) in enumerate(zip(batch, outs)):
        rec = {"index": lo + i, "prompt": texts[lo + i], "completion": tok.decode(
            [t for t in c.tokens if t != tok.eos_id]), "prompt_ids": p,
               "completion_ids": c.tokens, "finished": c.finished, "stage": stage, "k": k_out,
               "method": method}
        if stats is not None:
          rec.update(drafted=c.drafted, accepted=c.accepted)
        f.write(json.dumps(rec) + "\n")
        records.append(rec)
        n_tokens += len(c.tokens)
      note(f"{lo + len(batch)}/{len(ids)} prompts, {n_tokens} tokens")
  dt = time.perf_counter() - t0
  log.info("wrote %d samples to %s (%d tokens in %.1f s incl. compilation: %.0f tokens/s)",
           len(records), out_path, n_tokens, dt, n_tokens / dt)
  return records


def main(argv):
  del argv
  from kforcing_jax.observe import metrics_log
  metrics_log.configure_logging()
  from kforcing_jax.distill import sampling
  controls = sampling.Controls(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
  run(_WORKDIR.value, _PROMPTS.value, _OUT.value, _STAGE.value, _K.value, _BATCH.value,
      _MAX_NEW.value, _SEED.value, controls, _PENALTY.value, _STOP.value,
      not _NO_BOS.value, _EMA.value, _METHOD.value, _GAMMA.value, _CONFIDENCE.value,
      _COMMIT.value, _BLOCK.value, _RERANK.value)


if __name__ == "__main__":
  cli.run(main)
