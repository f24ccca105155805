"""Decode speed of PFLM(k) vs the AR baseline on the same backbone, cache code and inputs.

Per batch size B (prompts of --prompt_len random ids, --max_new_tokens fixed-length completions,
no EOS) it times, after a compile call and one warm-up call, the median of `reps` calls, each
ended by jax.block_until_ready. The methods take turns within each repetition (round-robin), so
drifting load on a shared machine cannot favour one of them:
  ar           the AR baseline: one jitted while_loop (prefill + max_new-1 one-token steps,
               inverse-CDF sampling at tau=1).
  ar_stepwise  the straightforward alternative: the same jitted prefill, then one jitted
               (donated) step per token called from Python. `ar` should match or beat it.
  pflm         PFLM decoding with k tokens per step (prefill + ceil(max_new/k)-1 steps of 2k
               positions), one jitted while_loop.
  pflm_verified, spec, spec_dynamic
               the lossless methods (serving/speculative.py): one jitted while_loop of draft +
               teacher-verify passes until every row has max_new_tokens; rows accept different
               numbers of tokens, so the batch runs until its slowest row is done.
               tokens_per_pass = tokens a row gains per teacher forward pass (AR: 1, PFLM: k).
  mdlm         the masked-diffusion stage (serving/mdlm.py): ceil(max_new/K) passes over the whole
               [prompt ; continuation], K tokens committed per pass, one jitted fori_loop
               (no cache: ttft_s and step_s are not defined; roofline bound 1).
tokens/s = B * max_new_tokens / seconds (prefill included, as in the paper); ttft_s = time to
first token = the jitted prefill alone; step_s = one decode step, timed as a fori_loop of all
the steps of a generation (from a prefilled state) divided by their number. The measured
roofline bound of PFLM(k) is k * step_s(AR) / step_s(PFLM k): the speedup decoding would reach
if generation were nothing but steps; frac_of_bound = speedup_vs_ar / roofline_bound.
matmul_bound = k * t(B rows) / t(2kB rows) for the chain of the model's weight matmuls alone
(qkv, out, MLP per layer, then the head on B resp. kB rows; random weights of the same shapes,
same compiler options as the decode programs): the ceiling the machine's matmul kernels put on
the roofline bound. It is near k where a step is memory-bound (GPUs, TPUs) and far below k on
CPUs whose small-M GEMM costs several times a 1-row GEMV.
"""

import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.bench import timing
from kforcing_jax.distill import sampling
from kforcing_jax.observe import metrics_log, report
from kforcing_jax.serving import decode, methods as methods_lib, speculative

METHODS = ("ar", "ar_stepwise", "pflm") + methods_lib.LOSSLESS + (methods_lib.MDLM,)

def _method_timers(engine: decode.Engine, spec: decode.DecodeSpec, inputs,
                   stepwise: bool = False) -> dict[str, tuple[Callable, Callable | None]]:
  """Timed callables of one engine/spec: whole generation, prefill (TTFT) and the decode steps
  (a fori_loop over all steps, run on a prefilled state made untimed beforehand)."""
  b, plen = inputs[0].shape
  pre = engine._program("prefill", spec, b, plen)
  prefilled = lambda: pre(engine.params, *inputs)
  if stepwise:
    step = engine._program("step", spec, b, plen)

    def whole():
      state = prefilled()
      for _ in range(spec.n_blocks - 1):
        state = step(engine.params, state)
      return state.tokens_BxT
  else:
    whole = lambda: engine.generate_arrays(spec, *inputs)
  timers = {"seconds": (whole, None), "ttft_s": (prefilled, None)}
  n_steps = spec.n_blocks - 1
  if n_steps and not stepwise:
    steps = engine._program("steps", spec, b, plen, n_steps)
    timers["steps_s"] = (lambda s: steps(engine.params, s).tokens_BxT, prefilled)
  return timers


def _medians(methods: dict, reps: int, progress: Callable[[str], None] | None = None) -> dict:
  """{method: {timer: median seconds, "times": the "seconds" timer's samples}}."""
  timed = timing.round_robin(methods, reps, progress)
  return {m: {**{t: st["seconds"] for t, st in ts.items()}, "times": ts["seconds"]["times"]}
          for m, ts in timed.items()}


def _matmul_chain(cfg, rows: int, head_rows: int, platform: str) -> Callable[[], jax.Array]:
  """The model's weight matmuls over `rows` rows (head: the last `head_rows`), ready to call."""
  d, hidden = cfg.d_model, cfg.mlp_width
  qkv, att = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.n_heads * cfg.head_dim
  mlp_in = 2 * hidden if cfg.mlp == "swiglu" else hidden  # gate and up in one matmul
  rng = np.random.RandomState(0)
  normal = lambda *shape: jnp.asarray(0.02 * rng.randn(*shape).astype(np.float32))
  layers = [(normal(d, qkv), normal(att, d), normal(d, mlp_in), normal(hidden, d))
            for _ in range(cfg.n_layers)]
  head = normal(d, cfg.vocab_size)

  def chain(x, layers, head):
    for w_qkv, w_out, w_in, w_mlp_out in layers:
      x = (((x @ w_qkv)[:, :att] @ w_out) @ w_in)[:, :hidden] @ w_mlp_out
    return x[-head_rows:] @ head

  opts = decode.compiler_options(platform, rows, decode.weight_bytes((layers, head)))
  fn = jax.jit(chain, compiler_options=opts)
  x = normal(rows, d)
  return lambda: fn(x, layers, head)


def matmul_bounds(cfg, batch: int, ks, reps: int = 20) -> dict[int, float]:
  """Per k: k * t(matmuls over B rows) / t(over 2kB rows), the kernels' ceiling on the bound.
  One round-robin over the B-row chain and every k's chain, so all k share one AR timing."""
  platform = jax.devices()[0].platform
  chains = {0: _matmul_chain(cfg, batch, batch, platform)}
  chains.update({k: _matmul_chain(cfg, 2 * k * batch, k * batch, platform) for k in ks})
  timed = _medians({k: {"seconds": (fn, None)} for k, fn in chains.items()}, reps)
  return {k: k * timed[0]["seconds"] / timed[k]["seconds"] for k in ks}


def measure(ar_engine: decode.Engine, pflm_engine: decode.Engine | None, batch_sizes, ks,
            prompt_len: int = 32, max_new_tokens: int = 128, reps: int = 5, seed: int = 0,
            stepwise: bool = True, progress: Callable[[str], None] = print,
            on_batch: Callable[[list[dict]], None] | None = None, pflm: bool = True,
            verified: dict | None = None, gamma: int = 4, confidence: float = 0.4,
            prompt_pool: list[list[int]] | None = None,
            controls: sampling.Controls = sampling.Controls(), mdlm_engine=None,
            mdlm_commit: str = "confidence", mdlm_block: int = 0) -> list[dict]:
  """Rows (one per method, k, batch size) with tokens/s, speedup, tokens per teacher pass and
  the roofline bound. `verified`: {method: speculative.VerifiedEngine} of the lossless methods
  (pflm_verified drafts k tokens for each k of `ks`; spec/spec_dynamic draft `gamma`).
  `prompt_pool`: token lists (>= prompt_len long) to draw prompts from (held-out text, so that
  acceptance rates mean something); else random ids. `on_batch(rows so far)` runs after each
  batch size (the CLI saves partial results). `controls`: the sampling controls of every
  method (the PFLM takes the temperature only). `mdlm_engine`: rows 'mdlm' for each k of `ks`
  (K tokens per pass, committed by `mdlm_commit` in blocks of `mdlm_block`)."""
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  verified = verified or {}
  if pflm and ks and pflm_engine is None:
    raise ValueError("PFLM k values were requested but no PFLM stage was given")
  # Random prompt ids below the mask id (it is never an input); imported models have none.
  vocab = ar_engine.cfg.mask_id if ar_engine.cfg.mask_id is not None else ar_engine.cfg.vocab_size
  rng = np.random.RandomState(seed)
  rows = []
  n_verified = sum(len(ks) if m == "pflm_verified" else 1 for m in verified)
  n_mdlm = len(ks) if mdlm_engine is not None else 0
  n_jobs = len(batch_sizes) * (1 + int(stepwise) + len(ks) * int(pflm) + n_verified + n_mdlm)
  note = metrics_log.Progress(n_jobs, progress).step

  for b in batch_sizes:
    if prompt_pool:
      prompts = [list(prompt_pool[i % len(prompt_pool)][:prompt_len]) for i in range(b)]
    else:
      prompts = rng.randint(0, vocab, size=(b, prompt_len)).tolist()
    ar_spec = methods_lib.decode_spec(0, max_new_tokens, controls=controls)
    ar_in = ar_engine.device_inputs(prompts, seed, prompt_len=prompt_len, batch_size=b)
    methods = {("ar", 1): _method_timers(ar_engine, ar_spec, ar_in)}
    if stepwise:
      methods[("ar_stepwise", 1)] = _method_timers(ar_engine, ar_spec, ar_in, stepwise=True)
    for k in ks if pflm else ():
      spec = decode.DecodeSpec(k=k, max_new_tokens=max_new_tokens, tau=controls.temperature)
      pflm_engine.check(spec)
      inputs = pflm_engine.device_inputs(prompts, seed, prompt_len=prompt_len, batch_size=b)
      methods[("pflm", k)] = _method_timers(pflm_engine, spec, inputs)
    for k in ks if mdlm_engine is not None else ():
      mspec = methods_lib.mdlm_spec(max_new_tokens, k, mdlm_commit, mdlm_block, controls)
      mdlm_engine.check(mspec)
      inputs = mdlm_engine.device_inputs(prompts, seed, prompt_len=prompt_len, batch_size=b)
      run = (lambda sp, x: lambda: mdlm_engine.generate_arrays(sp, *x))(mspec, inputs)
      methods[(methods_lib.MDLM, k)] = {"seconds": (run, None)}
    vspecs = {}
    for method, engine in verified.items():
      for g in (ks if method == "pflm_verified" else (gamma,)):
        vspec = methods_lib.verify_spec(method, engine.drafter.k, max_new_tokens, k=g,
                                        gamma=g, controls=controls, confidence=confidence,
                                        drafter_temps=engine.drafter.temperatures)
        engine.check(vspec)
        inputs = engine.base.device_inputs(prompts, seed, prompt_len=prompt_len, batch_size=b)
        run = (lambda e, sp, x: lambda: e.generate_arrays(sp, *x))(engine, vspec, inputs)
        methods[(method, g)] = {"seconds": (run, None)}
        vspecs[(method, g)] = (run, b)
    t_batch = time.time()
    timed = _medians(
        methods, reps, lambda msg: progress(f"B={b}: {msg}, {time.time() - t_batch:.0f}s"))
    runs = []
    for (method, k), r in timed.items():
      n_steps = -(-max_new_tokens // k) - 1
      r["step_s"] = r["steps_s"] / n_steps if "steps_s" in r else float("nan")
      r.setdefault("ttft_s", float("nan"))
      if (method, k) in vspecs:  # acceptance of one generation (deterministic for the seed)
        _, n_B, passes, drafted, accepted = jax.device_get(vspecs[(method, k)][0]())
        r["acceptance"] = speculative.summarize(n_B[:b], int(passes), drafted[:b], accepted[:b],
                                                max_new_tokens)
        r["tokens_per_pass"] = r["acceptance"]["tokens_per_pass"]
      else:
        r["tokens_per_pass"] = float(k if method in ("pflm", methods_lib.MDLM) else 1)
      runs.append((method, k, r))
      note(f"B={b} {method} k={k} {b * max_new_tokens / r['seconds']:.0f} tok/s")
    ar = timed[("ar", 1)]
    mm_bounds = matmul_bounds(ar_engine.cfg, b, ks, max(reps, 20)) if pflm and ks else {}
    for method, k, r in runs:
      bound = k * ar["step_s"] / r["step_s"] if method == "pflm" else 1.0
      speedup = ar["seconds"] / r["seconds"]
      mm_bound = mm_bounds[k] if method == "pflm" else 1.0
      row = {"method": method, "k": k, "batch_size": b, "prompt_len": prompt_len,
             "max_new_tokens": max_new_tokens,
             "tokens_per_s": b * max_new_tokens / r["seconds"], "seconds": r["seconds"],
             "ttft_s": r["ttft_s"], "step_s": r["step_s"], "speedup_vs_ar": speedup,
             "tokens_per_pass": r["tokens_per_pass"],
             "roofline_bound": bound, "frac_of_bound": speedup / bound,
             "matmul_bound": mm_bound, "times": r["times"], "reps": reps}
      if "acceptance" in r:
        row["acceptance"] = r["acceptance"]
      if method == methods_lib.MDLM:
        row.update(commit=mdlm_commit, block=mdlm_block)
      rows.append(row)
    if on_batch is not None:
      on_batch(rows)
  return rows


def machine() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "loadavg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


TABLE_COLUMNS = [("method", "<14"), ("k", ">3"), ("batch", ">7"), ("tokens/s", ">11.0f"),
                 ("speedup", ">9"), ("tok/pass", ">9.2f"), ("bound", ">7.2f"),
                 ("of bound", ">9"), ("mm bound", ">9.2f"), ("TTFT ms", ">9"), ("step ms", ">9")]


def table(rows: list[dict]) -> str:
  """k: the PFLM window, or the tokens drafted per teacher pass (spec: gamma)."""
  ms = lambda s, digits: "" if s != s else f"{1e3 * s:.{digits}f}"  # blank for NaN
  return report.text_table(TABLE_COLUMNS, (
      [r["method"], r["k"], r["batch_size"], r["tokens_per_s"], f"{r['speedup_vs_ar']:.2f}x",
       r.get("tokens_per_pass", 1.0), r["roofline_bound"], f"{100 * r['frac_of_bound']:.0f}%",
       r.get("matmul_bound", 1.0), ms(r["ttft_s"], 1), ms(r["step_s"], 2)] for r in rows))


def plot(rows: list[dict], out_png: str, title: str = "") -> None:
  """Speedup over AR vs batch size per k (solid), with the measured roofline bound (dashed)."""
  with report.figure(out_png) as (_, _, ax):
    ks = sorted({r["k"] for r in rows if r["method"] == "pflm"})
    for i, k in enumerate(ks):
      rs = report.by(rows, "batch_size", method="pflm", k=k)
      xs = [r["batch_size"] for r in rs]
      color = f"C{i}"
      ax.plot(xs, [r["speedup_vs_ar"] for r in rs], "o-", color=color, label=f"PFLM k={k}")
      ax.plot(xs, [r["roofline_bound"] for r in rs], "--", color=color, alpha=0.6,
              label=f"bound k={k}")
    styles = {"pflm_verified": "s-", "spec": "^-", "spec_dynamic": "v-", "mdlm": "D-"}
    n = len(ks)
    for method, style in styles.items():
      for k in sorted({r["k"] for r in rows if r["method"] == method}):
        rs = report.by(rows, "batch_size", method=method, k=k)
        ax.plot([r["batch_size"] for r in rs], [r["speedup_vs_ar"] for r in rs], style,
                color=f"C{n}",
                label=f"{method} {'gamma' if method.startswith('spec') else 'k'}={k}")
        n += 1
    rs = report.by(rows, "batch_size", method="ar_stepwise")
    if rs:
      ax.plot([r["batch_size"] for r in rs], [r["speedup_vs_ar"] for r in rs], "x:",
              color="gray", label="AR, per-step Python loop")
    ax.axhline(1.0, color="black", linewidth=0.8)
    report.finish_axes(
        ax, "batch size", "throughput speedup over AR (x)", log2_x=True, legend_size=None,
        title=title or "decode speedup over AR (dashed: k * t(1-token step) / t(2k step))",
        title_size=10)
    ax.legend(fontsize=8, ncol=2)
