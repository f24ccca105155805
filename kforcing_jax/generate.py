"""Generate completions with a trained stage (AR teacher or PFLM) from a JSONL file of prompts.

  python -m kforcing_jax.generate --workdir runs/kjv_tiny [--stage k4] \
      --prompts prompts.jsonl --k 4 --batch_size 64 --max_new_tokens 128 --out samples.jsonl

Each input line is {"prompt": "..."} (or {"text": ...}, or a bare JSON string). Each output line:
{"index", "prompt", "completion", "prompt_ids", "completion_ids", "finished", "stage", "k",
"method"}. The stage defaults to the last one of the chain; --k defaults to the stage's trained
window (any k' <= it works); the teacher decodes as the AR baseline (inverse-CDF sampling at
tau=1 from the same per-row uniform streams, or --greedy). Prompts are prefixed with the
tokenizer's end-of-document id (the training data's document separator) unless --no_bos.
Row i's uniforms come from (--seed, i), so a sample does not depend on --batch_size.
"""

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
_GREEDY = flags.DEFINE_bool("greedy", False, "AR teacher: argmax instead of inverse-CDF.")
_PENALTY = flags.DEFINE_float("frequency_penalty", 0.0, "Subtract penalty * count from logits.")
_STOP = flags.DEFINE_bool("stop_at_eos", True, "Stop a row at the end-of-document token.")
_NO_BOS = flags.DEFINE_bool("no_bos", False, "Do not prefix prompts with the eos id.")
_EMA = flags.DEFINE_bool("use_ema", True, "Load the EMA weights when the checkpoint has them.")
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


def make_spec(trained_k: int, k: int, max_new_tokens: int, greedy: bool = False,
              frequency_penalty: float = 0.0, eos_id: int | None = None):
  """The DecodeSpec for a stage: AR baseline for the teacher, PFLM(k or its trained k) else."""
  from kforcing_jax import decode
  if trained_k == 0:
    if k > 1:
      raise ValueError(f"--k={k}: the teacher is an AR model and decodes one token per step")
    return decode.DecodeSpec(k=1, max_new_tokens=max_new_tokens, ar=True, greedy=greedy,
                             frequency_penalty=frequency_penalty, eos_id=eos_id)
  return decode.DecodeSpec(k=k or trained_k, max_new_tokens=max_new_tokens,
                           frequency_penalty=frequency_penalty, eos_id=eos_id)


def run(workdir: str, prompts_path: str, out_path: str, stage: str = "", k: int = 0,
        batch_size: int = 64, max_new_tokens: int = 128, seed: int = 0, greedy: bool = False,
        frequency_penalty: float = 0.0, stop_at_eos: bool = True, bos: bool = True,
        use_ema: bool = True) -> list[dict]:
  """Generate for every prompt of `prompts_path`; writes and returns the output records."""
  import tqdm
  from kforcing_jax import decode, metrics_log, stage_io

  log = metrics_log.log
  stage = stage or (stage_io.list_stages(workdir) or [""])[-1]
  if not stage:
    raise FileNotFoundError(f"no checkpoints under {stage_io.stages_dir(workdir)}")
  loaded = stage_io.load_stage(workdir, stage, use_ema=use_ema)
  tok = loaded.tokenizer
  spec = make_spec(loaded.k, k, max_new_tokens, greedy, frequency_penalty,
                   tok.eos_id if stop_at_eos else None)
  engine = decode.Engine.from_stage(loaded)
  engine.check(spec)
  texts = read_prompts(prompts_path)
  ids = [([tok.eos_id] if bos else []) + tok.encode(t) for t in texts]
  if not all(ids):
    raise ValueError("an empty prompt with --no_bos has no token to condition on")
  method = "ar_greedy" if spec.ar and spec.greedy else ("ar" if spec.ar else "pflm")
  log.info("stage %s (step %d, trained k=%d): %s decoding, k=%d, %d prompts, batch %d, "
           "%d new tokens", stage, loaded.step, loaded.k, method, spec.k, len(ids), batch_size,
           max_new_tokens)
  records, t0, n_tokens = [], time.perf_counter(), 0
  plen = decode.bucket_len(max(len(p) for p in ids))  # one prompt bucket for the whole file
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w", encoding="utf-8") as f, tqdm.tqdm(total=len(ids), unit="prompt") as bar:
    for lo in range(0, len(ids), batch_size):
      batch = ids[lo:lo + batch_size]
      outs = engine.generate(batch, spec, seed=seed, row_ids=range(lo, lo + len(batch)),
                             batch_size=batch_size, prompt_len=plen)
      for i, (p, c) in enumerate(zip(batch, outs)):
        rec = {"index": lo + i, "prompt": texts[lo + i], "completion": tok.decode(
            [t for t in c.tokens if t != tok.eos_id]), "prompt_ids": p,
               "completion_ids": c.tokens, "finished": c.finished, "stage": stage, "k": spec.k,
               "method": method}
        f.write(json.dumps(rec) + "\n")
        records.append(rec)
        n_tokens += len(c.tokens)
      bar.update(len(batch))
  dt = time.perf_counter() - t0
  log.info("wrote %d samples to %s (%d tokens in %.1f s incl. compilation: %.0f tokens/s)",
           len(records), out_path, n_tokens, dt, n_tokens / dt)
  return records


def main(argv):
  del argv
  from kforcing_jax import metrics_log
  metrics_log.configure_logging()
  run(_WORKDIR.value, _PROMPTS.value, _OUT.value, _STAGE.value, _K.value, _BATCH.value,
      _MAX_NEW.value, _SEED.value, _GREEDY.value, _PENALTY.value, _STOP.value,
      not _NO_BOS.value, _EMA.value)


if __name__ == "__main__":
  cli.run(main)
