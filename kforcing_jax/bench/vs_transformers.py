"""Decode speed of an imported teacher: our jitted AR decoder vs transformers' own `generate`.

  python -m kforcing_jax.bench.vs_transformers --workdir runs/smollm2 --batch_sizes 1,4,16 \
      --max_new_tokens 32 --out docs/results/smollm2_vs_transformers.json

The same weights on both sides: transformers' model is built from the stage's exported
config and tensors (`interop/hf_format.py`), not re-read from the source file. Greedy decoding
of --max_new_tokens tokens (no EOS stop) from --prompt_len-token prompts, at float32 and
bfloat16 matmuls (ours: `model.dtype`, float32 residual stream and norms; transformers: the
whole model cast with `.to(torch.bfloat16)`), prefill included. Every (implementation, dtype)
takes its turn within each repetition (`bench/timing.round_robin`), one batch size at a time.
Also checks that both sides produced the same float32 tokens. Prints a table; writes JSON (with
provenance) and a PNG of tokens/s vs batch size.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli
from kforcing_jax.bench import timing
from kforcing_jax.config import check as config_check
from kforcing_jax.interop import hf_format
from kforcing_jax.observe import metrics_log, report
from kforcing_jax.serving import decode
from kforcing_jax.training import stage_io

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir holding an imported teacher stage.")
_STAGE = flags.DEFINE_string("stage", "teacher", "The AR stage to time.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per row.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions (after one compile + one warm-up).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Matmul dtypes to time.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: all cores).")
_OUT = flags.DEFINE_string("out", "vs_transformers.json", "Output JSON (PNG beside it).")
flags.mark_flag_as_required("workdir")

COLUMNS = [("impl", "<14"), ("dtype", "<10"), ("batch", ">6"), ("tokens/s", ">10.1f"),
           ("ours / theirs", ">14")]


def hf_model(loaded: stage_io.LoadedStage, dtype: str):
  """transformers' CausalLM with exactly the stage's weights."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cfg_dict = hf_format.config_to_hf(loaded.model_cfg)
  config = transformers.AutoConfig.for_model(**cfg_dict)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  host = jax.tree.map(np.asarray, jax.device_get(loaded.params))
  tensors = hf_format.to_hf(host, loaded.model_cfg)
  state = {n: torch.from_numpy(np.array(v)) for n, v in tensors.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  tied = loaded.model_cfg.tie_embeddings
  missing = [n for n in missing if not (tied and n == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"weights do not fit transformers' model: missing {missing}, "
                       f"unexpected {unexpected}")
  if loaded.model_cfg.tie_embeddings:
    model.tie_weights()
  return model.to(getattr(torch, dtype))


def measure(loaded: stage_io.LoadedStage, batch_sizes, dtypes, prompt_len: int,
            max_new_tokens: int, reps: int, progress=print) -> list[dict]:
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  vocab = loaded.model_cfg.vocab_size if loaded.model_cfg.mask_id is None else (
      loaded.model_cfg.mask_id)
  engines = {dt: decode.Engine(loaded.graphdef, loaded.params,
                               dataclasses.replace(loaded.model_cfg, dtype=dt), 0, loaded.mesh)
             for dt in dtypes}
  theirs = {dt: hf_model(loaded, dt) for dt in dtypes}
  spec = decode.DecodeSpec(k=1, max_new_tokens=max_new_tokens, ar=True, tau=0.0)
  rows, note = [], metrics_log.Progress(len(batch_sizes), progress).step
  for b in batch_sizes:
    prompts = rng.randint(0, vocab, size=(b, prompt_len))
    methods, outputs = {}, {}
    for dt in dtypes:
      inputs = engines[dt].device_inputs(prompts.tolist(), 0, prompt_len=prompt_len, batch_size=b)
      methods[("kforcing_jax", dt)] = {"seconds": (
          (lambda e, x: lambda: e.generate_arrays(spec, *x)[0])(engines[dt], inputs), None)}

      def run_hf(model=theirs[dt], key=("transformers", dt)):
        with torch.no_grad():
          out = model.generate(torch.from_numpy(prompts), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False,
                               attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                               pad_token_id=0, eos_token_id=None)
        outputs[key] = out[:, prompt_len:].numpy()
      methods[("transformers", dt)] = {"seconds": (run_hf, None)}
    t0 = time.time()
    timed = timing.round_robin(methods, reps,
                               lambda msg: progress(f"B={b}: {msg}, {time.time() - t0:.0f}s"))
    ours_f32 = np.asarray(jax.device_get(methods[("kforcing_jax", dtypes[0])]["seconds"][0]()))
    same = bool(np.array_equal(ours_f32[:b, :max_new_tokens], outputs[("transformers",
                                                                        dtypes[0])]))
    for (impl, dt), t in timed.items():
      tps = b * max_new_tokens / t["seconds"]["seconds"]
      rows.append({"impl": impl, "dtype": dt, "batch_size": b, "tokens_per_s": tps,
                   "seconds": t["seconds"]["seconds"], "times": t["seconds"]["times"],
                   "compile_s": t["seconds"]["compile_s"], "prompt_len": prompt_len,
                   "max_new_tokens": max_new_tokens, "reps": reps,
                   "same_tokens_as_transformers": same if dt == dtypes[0] else None})
    for r in rows[-len(timed):]:
      other = next(o for o in rows[-len(timed):] if o["dtype"] == r["dtype"]
                   and o["impl"] != r["impl"])
      r["speedup_ours_over_transformers"] = (r["tokens_per_s"] / other["tokens_per_s"]
                                             if r["impl"] == "kforcing_jax" else
                                             other["tokens_per_s"] / r["tokens_per_s"])
    note(f"B={b}: " + ", ".join(f"{r['impl']} {r['dtype']} {r['tokens_per_s']:.1f} tok/s"
                                for r in rows[-len(timed):]) + f"; same float32 tokens: {same}")
  return rows


def table(rows: list[dict]) -> str:
  return report.text_table(COLUMNS, ([r["impl"], r["dtype"], r["batch_size"], r["tokens_per_s"],
                                      f"{r['speedup_ours_over_transformers']:.2f}x"]
                                     for r in rows))


def plot(rows: list[dict], out_png: str, title: str) -> None:
  with report.figure(out_png) as (_, _, ax):
    for i, impl in enumerate(("kforcing_jax", "transformers")):
      for dt, style in (("float32", "o-"), ("bfloat16", "s--")):
        rs = report.by(rows, "batch_size", impl=impl, dtype=dt)
        if rs:
          ax.plot([r["batch_size"] for r in rs], [r["tokens_per_s"] for r in rs], style,
                  color=f"C{i}", label=f"{impl} {dt}")
    report.finish_axes(ax, "batch size", "greedy decode tokens/s", title, log2_x=True)


def main(argv):
  del argv
  metrics_log.configure_logging()
  import torch  # pylint: disable=import-outside-toplevel
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  loaded = stage_io.load_stage(_WORKDIR.value, _STAGE.value,
                               mesh=stage_io.default_mesh())
  if loaded.k:
    raise config_check.UserError(f"stage {_STAGE.value!r} is a PFLM; time an AR stage")
  batch_sizes = [int(b) for b in _BATCHES.value]
  rows = measure(loaded, batch_sizes, _DTYPES.value, _PROMPT_LEN.value, _MAX_NEW.value,
                 _REPS.value)
  print(table(rows))
  name = loaded.meta.get("converted_from", _WORKDIR.value)
  report.write_result(_OUT.value, {"stage": _STAGE.value, "source": name,
                                   "model_config": dataclasses.asdict(loaded.model_cfg),
                                   "torch_threads": torch.get_num_threads(), "rows": rows})
  png = _OUT.value.rsplit(".", 1)[0] + ".png"
  plot(rows, png, f"{_STAGE.value} of {_WORKDIR.value}: greedy decode, "
                  f"{_PROMPT_LEN.value}+{_MAX_NEW.value} tokens")
  print(f"wrote {_OUT.value} and {png}")


if __name__ == "__main__":
  cli.run(main)
