"""Training cost of distillation in AR-step units, and the two-stream forward vs a dense mask.

  python -m kforcing_jax.bench.train_cost --out runs/bench_train_cost \
      [--seq_lens 128,512] [--ks 1,2,4] [--batch 4] \
      [--d_model 256 --n_layers 4 --n_heads 4 --vocab 8192] [--reps 5] [--dense_reps N] \
      [--single_stage --cdf_blur 0.01] [--tau_range 0.5,1.2,0.1]

Everything runs in ONE process on ONE device (a 1x1 mesh over jax.devices()[:1]), with random
parameters (the zero-initialised output head is randomised so argmax / inverse-CDF targets are not
degenerate) and random tokens. Per sequence length L it measures:

  ar_step            the AR teacher's train step (forward + backward + clip + AdamW), through
                     train_step.make_train_step with trainer.ar_loss_fn: the real code path.
  rollout            the frozen teacher's target computation alone (jit of distill.make_targets):
                     k=1: the AR teacher, one inverse-CDF round; k>=2: a PFLM(k/2) teacher rolled
                     out R=2 argmax rounds (the paper's AR -> 1 -> 2 -> 4 chain).
  distill_step       the PFLM(k) student's train step INCLUDING that teacher rollout inside the
                     same jitted step (distill.make_loss_fn(StageSpec(k, k/2 or 0)) +
                     make_train_step, teacher params passed as `frozen`).
  forward_efficient  PFLM.noise_logits(dense=False) under jit, forward only, logits summed to a
                     scalar (context pass + window pass with window_attention).
  forward_dense      PFLM.noise_logits(dense=True): the reference (N + N*k)^2 dense-mask forward.

Method (bench/timing.py, the harness decode_speed uses too): per L, everything above is timed
round-robin, so load drifting on a shared machine hits every kind alike: a first call (its
trace + lowering + XLA compile time from jax.monitoring events is compile_s), 1 warm-up call,
then --reps rounds, each calling every kind once (medians; each call ended by
jax.block_until_ready). The efficient and dense forwards take turns in a second round-robin of
--dense_reps rounds. Train steps keep feeding back their (donated) state.

How to read the table:
  distill/AR            distill_step seconds in AR-step units. The student sees N + N*k tokens,
                        so ~(1 + k) AR steps of student work plus the teacher rollout is the
                        natural cost.
  budget 1.2(1+k)       the cost target, in AR steps; vs_budget = distill / (1.2*(1+k)*AR +
                        rollout): <= 1 means within budget (the rollout is allowed on top).
  vs_model              distill / ((1+k)*AR + rollout): ~1 means the distill step costs what its
                        parts predict; > 1 is overhead (e.g. the k*V-wide logits and their loss).
  speedup               forward_dense / forward_efficient at the same (L, k); the efficient form
                        does O(k N^2) attention instead of O(k^2 N^2), so it should grow with k
                        and L. MLP, projections and the head are the same work in both.

Outputs: a table on stdout, DIR/train_cost.json ({"provenance", "machine", "settings", "rows"};
a row has kind, seq_len, k, batch, seconds (median), min_seconds, compile_s, first_call_s, times,
reps, loadavg_1m and the ratios above where meaningful) and DIR/train_cost.png (distill cost vs
k with the budget; forward speedup vs k). Figures from a CPU are CPU figures, and on a shared machine
they are only as good as its load: a warning is printed when the load average exceeded the CPU
count during the run.
"""

import dataclasses
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from kforcing_jax import cli
from kforcing_jax.bench import timing
from kforcing_jax.config import base as config_base
from kforcing_jax.config import check as config_check
from kforcing_jax.distill import targets as distill
from kforcing_jax.observe import report
from kforcing_jax.training import state as train_state, step as train_step, trainer
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib

BUDGET_FACTOR = 1.2  # The budget: a PFLM(k) distill step <= 1.2 * (1 + k) AR steps.

# ---- timing ----

class _StepRunner:
  """Calls a train step repeatedly, feeding back the donated state."""

  def __init__(self, step_fn, state, batch, frozen):
    self.step_fn, self.state, self.batch, self.frozen = step_fn, state, batch, frozen

  def __call__(self):
    self.state, metrics = self.step_fn(self.state, self.batch, self.frozen)
    return self.state, metrics


# ---- models and states ----

def _copy(tree):
  """Fresh buffers: train states are donated every step, the teacher params must survive."""
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def _random_params(cls, cfg: model_lib.ModelConfig, mesh, seed: int):
  """(graphdef, params) of a fresh model with a random (not zero) output head."""
  abstract = pflm_lib.stage_module(cfg, 0 if cls is model_lib.Transformer else 1)[1]
  graphdef = model_lib.split_params(abstract)[0]
  p_sh = sharding.param_shardings(abstract, mesh, fsdp=False)
  head_std = 2.0 / cfg.d_model ** 0.5  # logits of std ~2 over the vocabulary

  def init(key):
    with nnx.use_eager_sharding(False):
      _, params = model_lib.split_params(cls(cfg, nnx.Rngs(key)))
    params["head"] = head_std * jax.random.normal(jax.random.fold_in(key, 1),
                                                  params["head"].shape, jnp.float32)
    return params

  return graphdef, jax.jit(init, out_shardings=p_sh)(jax.random.key(seed))


def _train_step(cls, cfg, mesh, loss_fn, params, frozen, seed: int):
  """(step_fn, state) built exactly as trainer.train_loop does (EMA off, the default)."""
  optim = config_base.base_config().optim
  factory, abstract = pflm_lib.stage_module(cfg, 0 if cls is model_lib.Transformer else 1)
  parts = train_step.assemble(optim, 1000, abstract, mesh, False, loss_fn, frozen, seed)
  step_fn = parts.step_fn
  state = train_state.init_state(factory, parts.tx, parts.state_sh, seed, ema=parts.ema)
  state["params"] = pflm_lib.init_from(_copy(params), state["params"])
  return step_fn, state


def _spec(k: int, single_stage: bool = False, cdf_blur: float = 0.0) -> distill.StageSpec:
  """The paper's chain: AR -> PFLM(1) (inverse-CDF), then PFLM(k/2) -> PFLM(k) with R=2; or
  single_stage: AR -> PFLM(k) by k inverse-CDF rounds (the default's recipe, soft targets with
  cdf_blur)."""
  if single_stage:
    return distill.StageSpec(student_k=k, teacher_k=0, cdf_blur=cdf_blur)
  return distill.StageSpec(student_k=k, teacher_k=0 if k == 1 else k // 2,
                           cdf_blur=cdf_blur if k == 1 else 0.0)


# ---- the benchmark ----

def run(seq_lens: list[int], ks: list[int], batch: int = 4, d_model: int = 256,
        n_layers: int = 4, n_heads: int = 4, vocab: int = 8192, reps: int = 5,
        dense_reps: int | None = None, seed: int = 0, single_stage: bool = False,
        cdf_blur: float = 0.0, tau_range: tuple[float, float, float] | None = None) -> dict:
  """Measure every kind at every (L, k); returns {"machine", "settings", "rows", "wall_s"}.
  tau_range (tau_min, tau_max, greedy_share): also `distill_step_tau`, the same step trained on
  that temperature range, in the same round-robin (the cost of temperature conditioning)."""
  dense_reps = reps if dense_reps is None else dense_reps
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(1, 1, devices)
  cfg = model_lib.ModelConfig(vocab_size=vocab, mask_id=vocab - 1, d_model=d_model,
                              n_layers=n_layers, n_heads=n_heads)
  machine = {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
             "cpu_count": os.cpu_count(), "jax": jax.__version__,
             "processor": platform.processor() or platform.machine(),
             "python": platform.python_version(),
             # Other processes on the machine skew CPU timings; compare with cpu_count.
             "loadavg_1m_at_start": os.getloadavg()[0]}
  settings = {"seq_lens": seq_lens, "ks": ks, "batch": batch, "d_model": d_model,
              "n_layers": n_layers, "n_heads": n_heads, "vocab": vocab, "reps": reps,
              "dense_reps": dense_reps, "seed": seed, "single_stage": single_stage,
              "cdf_blur": cdf_blur, "tau_range": list(tau_range) if tau_range else None}
  settings.update(optimizer="AdamW + clip 1.0 (config_base defaults), EMA off",
                  budget_factor=BUDGET_FACTOR, dtype=cfg.dtype)
  print(f"device: {machine['device_kind']} ({machine['platform']}), {machine['cpu_count']} CPUs, "
        f"jax {machine['jax']}", flush=True)
  print(f"model: d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} V={cfg.vocab_size}; "
        f"batch {batch}; reps {reps} (dense forward {dense_reps})", flush=True)

  ar_graphdef, ar_params = _random_params(model_lib.Transformer, cfg, mesh, seed)
  pflm_graphdef, pflm_params = _random_params(pflm_lib.PFLM, cfg, mesh, seed + 1)
  batch_sh = sharding.batch_sharding(mesh)
  rows = []
  total = len(seq_lens) * (1 + (5 if tau_range else 4) * len(ks))
  t_start = time.perf_counter()

  def record(row: dict) -> dict:
    rows.append(row)
    extra = "".join(f", {key} {row[key]:.2f}" for key in ("ratio_to_ar", "speedup_vs_dense")
                    if key in row)
    print(f"[{len(rows):2d}/{total}] {row['kind']:<17s} L={row['seq_len']:<5d} k={row['k']}: "
          f"median {row['seconds']:.4f} s over {row['reps']} reps (compile {row['compile_s']:.1f}"
          f" s){extra}  [{time.perf_counter() - t_start:.0f} s elapsed]", flush=True)
    return row

  for li, n in enumerate(seq_lens):
    key = jax.random.key(seed * 1000 + li)
    tokens = jax.device_put(
        jax.random.randint(key, (batch, n), 0, cfg.mask_id, jnp.int32), batch_sh)
    base = {"seq_len": n, "batch": batch}
    step_fn, state = _train_step(model_lib.Transformer, cfg, mesh,
                                 trainer.ar_loss_fn(ar_graphdef), ar_params, (), seed)
    steps = {("ar_step", 0): _StepRunner(step_fn, state, tokens, ())}
    forwards = {}
    for k in ks:
      spec = _spec(k, single_stage, cdf_blur)
      t_graphdef, t_params = ((ar_graphdef, ar_params) if spec.teacher_k == 0
                              else (pflm_graphdef, pflm_params))
      zkey, ukey = jax.random.split(jax.random.fold_in(key, k))
      z = jax.random.uniform(zkey, (batch, n, k), jnp.float32)
      u = jax.random.uniform(ukey, (batch, n, k), jnp.float32)

      @jax.jit
      def targets_fn(params, tokens_BxN, z_BxNxK, u_BxNxK, spec=spec, graphdef=t_graphdef):
        teacher = model_lib.merge(graphdef, params)
        return distill.make_targets(spec, teacher, tokens_BxN, z_BxNxK, u_BxNxK)[0]

      steps[("rollout", k)] = (lambda f=targets_fn, p=t_params, z=z, u=u: f(p, tokens, z, u))
      loss_fn = distill.make_loss_fn(spec, pflm_graphdef, t_graphdef)
      step_fn, state = _train_step(pflm_lib.PFLM, cfg, mesh, loss_fn, t_params, t_params,
                                   seed)
      steps[("distill_step", k)] = _StepRunner(step_fn, state, tokens, t_params)
      if tau_range:
        tau_spec = dataclasses.replace(spec, tau_min=tau_range[0], tau_max=tau_range[1],
                                       greedy_share=tau_range[2])
        step_fn, state = _train_step(pflm_lib.PFLM, cfg, mesh, distill.make_loss_fn(
            tau_spec, pflm_graphdef, t_graphdef), t_params, t_params, seed)
        steps[("distill_step_tau", k)] = _StepRunner(step_fn, state, tokens, t_params)
      for dense in (False, True):
        @jax.jit
        def forward(params, tokens_BxN, z_BxNxK, dense=dense):
          student = model_lib.merge(pflm_graphdef, params)
          return student.noise_logits(tokens_BxN, z_BxNxK, dense=dense).sum()

        kind = "forward_dense" if dense else "forward_efficient"
        forwards[(kind, k)] = lambda f=forward, z=z: f(pflm_params, tokens, z)
    del step_fn, state

    # Two round-robins per L (bench/timing.py): the train steps whose ratios the table reports,
    # then the efficient vs dense forwards (the dense one is slow: its own rep count).
    say = lambda msg, n=n: print(f"  L={n}: {msg} [{time.perf_counter() - t_start:.0f} s]",
                                 flush=True)
    timed = {**timing.round_robin({m: {"seconds": (f, None)} for m, f in steps.items()},
                                  reps, say),
             **timing.round_robin({m: {"seconds": (f, None)} for m, f in forwards.items()},
                                  dense_reps, say)}
    del steps
    row = lambda kind, k, **extra: {"kind": kind, "k": k, **base, **extra,
                                    **timed[(kind, k)]["seconds"]}
    ar = row("ar_step", 0)
    ar["tokens_per_s"] = batch * n / ar["seconds"]
    record(ar)
    for k in ks:
      teacher_k = _spec(k, single_stage).teacher_k
      roll = row("rollout", k, teacher_k=teacher_k)
      roll["ratio_to_ar"] = roll["seconds"] / ar["seconds"]
      record(roll)
      dist = row("distill_step", k, teacher_k=teacher_k)
      dist["ratio_to_ar"] = dist["seconds"] / ar["seconds"]
      dist["budget_ar_steps"] = BUDGET_FACTOR * (1 + k)
      dist["ratio_to_budget"] = dist["seconds"] / (
          BUDGET_FACTOR * (1 + k) * ar["seconds"] + roll["seconds"])
      dist["ratio_to_model"] = dist["seconds"] / ((1 + k) * ar["seconds"] + roll["seconds"])
      record(dist)
      if tau_range:
        cond = row("distill_step_tau", k, teacher_k=teacher_k)
        cond["ratio_to_plain"] = cond["seconds"] / dist["seconds"]
        record(cond)
      eff, dense = row("forward_efficient", k), row("forward_dense", k)
      eff["speedup_vs_dense"] = dense["seconds"] / eff["seconds"]
      dense["ratio_to_efficient"] = dense["seconds"] / eff["seconds"]
      record(eff)
      record(dense)
  machine["loadavg_1m_at_end"] = os.getloadavg()[0]
  wall = time.perf_counter() - t_start
  return {"machine": machine, "settings": settings, "rows": rows, "wall_s": wall}


# ---- report ----

def _find(rows, kind, n, k=None):
  for r in rows:
    if r["kind"] == kind and r["seq_len"] == n and (k is None or r["k"] == k):
      return r
  return None


STEP_COLUMNS = [("L", ">5"), ("k", ">2"), ("teacher", ">8"), ("AR step", ">9.4f"),
                ("rollout", ">9.4f"), ("distill", ">9.4f"), ("distill/AR", ">10.2f"),
                ("budget", ">7.1f"), ("vs_budget", ">9.2f"), ("vs_model", ">8.2f"),
                ("compile", ">8")]
TAU_COLUMNS = [("L", ">5"), ("k", ">2"), ("tau = 1", ">9.4f"), ("range", ">9.4f"),
               ("ratio", ">8")]
FORWARD_COLUMNS = [("L", ">5"), ("k", ">2"), ("efficient", ">10.4f"), ("dense", ">10.4f"),
                   ("speedup", ">8"), ("compile eff/dense", ">18")]


def format_table(result: dict) -> str:
  rows, s = result["rows"], result["settings"]
  steps = []
  for n in s["seq_lens"]:
    ar = _find(rows, "ar_step", n)
    steps.append([n, "-", "-", ar["seconds"], "-", "-", 1.0, "-", "-", "-",
                  f"{ar['compile_s']:.1f}s"])
    for k in s["ks"]:
      d, r = _find(rows, "distill_step", n, k), _find(rows, "rollout", n, k)
      teacher = "AR" if d["teacher_k"] == 0 else f"PFLM({d['teacher_k']})"
      steps.append([n, k, teacher, ar["seconds"], r["seconds"], d["seconds"], d["ratio_to_ar"],
                    d["budget_ar_steps"], d["ratio_to_budget"], d["ratio_to_model"],
                    f"{d['compile_s']:.1f}s"])
  forwards = []
  for n in s["seq_lens"]:
    for k in s["ks"]:
      e, d = _find(rows, "forward_efficient", n, k), _find(rows, "forward_dense", n, k)
      forwards.append([n, k, e["seconds"], d["seconds"], f"{e['speedup_vs_dense']:.2f}x",
                       f"{e['compile_s']:.1f}s/{d['compile_s']:.1f}s"])
  tau = []
  for n in s["seq_lens"]:
    for k in s["ks"] if s.get("tau_range") else ():
      c = _find(rows, "distill_step_tau", n, k)
      tau.append([n, k, _find(rows, "distill_step", n, k)["seconds"], c["seconds"],
                  f"{c['ratio_to_plain']:.3f}x"])
  extra = ["", f"Temperature conditioning (tau_min, tau_max, greedy_share = {s['tau_range']}): "
           "distill step on the range vs at tau = 1 (median seconds)",
           report.text_table(TAU_COLUMNS, tau, sep=" ")] if tau else []
  return "\n".join([
      f"Train step cost (median seconds; batch {s['batch']}; AR step = forward + backward + "
      f"AdamW; distill step includes the teacher rollout)",
      report.text_table(STEP_COLUMNS, steps, sep=" "),
      "  budget = 1.2*(1+k) AR steps; vs_budget = distill / (budget*AR + rollout) (<= 1: "
      "within budget);", "  vs_model = distill / ((1+k)*AR + rollout)", "",
      "Student forward (PFLM.noise_logits, forward only; median seconds)",
      report.text_table(FORWARD_COLUMNS, forwards, sep=" ")] + extra)


def plot(result: dict, out_png: str) -> None:
  rows, s, m = result["rows"], result["settings"], result["machine"]
  ks = s["ks"]
  title = (f"{m['device_kind']} ({m['platform']}, {m['cpu_count']} CPUs); batch {s['batch']}, "
           f"d={s['d_model']}, layers={s['n_layers']}, V={s['vocab']}")
  with report.figure(out_png, 2, (11, 4.5), title, 9) as (_, _, (ax1, ax2)):
    _plot_panels(ax1, ax2, rows, s["seq_lens"], ks)


def _plot_panels(ax1, ax2, rows, seq_lens, ks) -> None:
  """Left: distill step cost in AR steps against the budget; right: forward speedup."""
  for i, n in enumerate(seq_lens):
    color = f"C{i}"
    ar = _find(rows, "ar_step", n)["seconds"]
    dist = [_find(rows, "distill_step", n, k)["seconds"] / ar for k in ks]
    roll = [_find(rows, "rollout", n, k)["seconds"] / ar for k in ks]
    ax1.plot(ks, dist, "o-", color=color, label=f"distill step, L={n}")
    ax1.plot(ks, [BUDGET_FACTOR * (1 + k) + r for k, r in zip(ks, roll)], ":", color=color,
             label=f"budget + rollout, L={n}")
    ax2.plot(ks, [_find(rows, "forward_efficient", n, k)["speedup_vs_dense"] for k in ks], "o-",
             color=color, label=f"L={n}")
  ax1.plot(ks, [BUDGET_FACTOR * (1 + k) for k in ks], "k--", label="budget 1.2(1+k)")
  ax2.axhline(1.0, color="gray", lw=1)
  ax2.axhline(2.0, color="gray", lw=1, ls="--", label="2x target")
  report.finish_axes(ax1, "student window k", "seconds / AR train step",
                     "PFLM(k) distillation step cost", log2_x=True)
  report.finish_axes(ax2, "student window k", "dense / efficient forward time",
                     "Two-stream forward: efficient vs dense mask", log2_x=True)
  for ax in (ax1, ax2):
    ax.set_xticks(ks, [str(k) for k in ks])


# Its own FlagValues: tests import this module next to other CLIs whose absl flags share names
# (--out, --seed), so these flags stay out of the global registry.
FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string("out", None, "Directory for train_cost.json / train_cost.png.",
                           flag_values=FLAGS, required=True)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512"], "Sequence lengths.", flag_values=FLAGS)
_KS = flags.DEFINE_list("ks", ["1", "2", "4"], "Student windows: 1 (AR teacher) or even k "
                        "(PFLM(k/2) teacher, R=2).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.", flag_values=FLAGS)
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.", flag_values=FLAGS)
_N_LAYERS = flags.DEFINE_integer("n_layers", 4, "Blocks.", flag_values=FLAGS)
_N_HEADS = flags.DEFINE_integer("n_heads", 4, "Attention heads.", flag_values=FLAGS)
_VOCAB = flags.DEFINE_integer("vocab", 8192, "Vocabulary size.", flag_values=FLAGS)
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per measurement (median).", flag_values=FLAGS)
_DENSE_REPS = flags.DEFINE_integer("dense_reps", None, "Timed runs of the dense-mask forward "
                                   "(default: --reps).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.",
                             flag_values=FLAGS)
_SINGLE = flags.DEFINE_bool("single_stage", False, "Every k distils from the AR teacher by k "
                            "inverse-CDF rounds (the default config's recipe).",
                            flag_values=FLAGS)
_BLUR = flags.DEFINE_float("cdf_blur", 0.0, "Soft targets of AR-teacher stages "
                           "(config.distill.cdf_blur; the default config: 0.01).",
                           flag_values=FLAGS)
_TAU = flags.DEFINE_list("tau_range", [], "tau_min,tau_max,greedy_share: also time the distill "
                         "step trained on that temperature range (the default: 0.5,1.2,0.1).",
                         flag_values=FLAGS)


def main(argv=None) -> dict:
  """Parse `argv` (absl syntax; default sys.argv[1:]), measure, print, write; a bad flag value
  raises config_check.UserError."""
  try:
    FLAGS.unparse_flags()
    FLAGS(["train_cost"] + list(sys.argv[1:] if argv is None else argv))
    seq_lens, ks = ([int(x) for x in holder.value if x.strip()] for holder in (_SEQ_LENS, _KS))
    tau_range = tuple(float(x) for x in _TAU.value) or None
    if tau_range and len(tau_range) != 3:
      raise ValueError(f"--tau_range takes tau_min,tau_max,greedy_share, got {_TAU.value}")
  except (flags.Error, ValueError) as e:
    raise config_check.UserError(f"train_cost: {e}") from None
  bad = [k for k in ks if k < 1 or (k > 1 and k % 2 and not _SINGLE.value)]
  if bad:
    raise config_check.UserError(f"--ks: {bad} not supported; use 1 or even k (the teacher is "
                                 "PFLM(k/2) with R=2)")
  if _REPS.value < 1:
    raise config_check.UserError("--reps must be >= 1")
  os.makedirs(_OUT.value, exist_ok=True)
  result = run(seq_lens, ks, _BATCH.value, _D_MODEL.value, _N_LAYERS.value, _N_HEADS.value,
               _VOCAB.value, _REPS.value, _DENSE_REPS.value, _SEED.value, _SINGLE.value,
               _BLUR.value, tau_range)
  print("\n" + format_table(result))
  busiest = max(r["loadavg_1m"] for r in result["rows"])
  if busiest > result["machine"]["cpu_count"] + 1:
    print(f"\nWARNING: 1-minute load average reached {busiest:.1f} on "
          f"{result['machine']['cpu_count']} CPUs: other processes competed for the CPU, so "
          f"these timings are inflated and noisy (see rows[].times / loadavg_1m in the JSON).")
  json_path = os.path.join(_OUT.value, "train_cost.json")
  png_path = os.path.join(_OUT.value, "train_cost.png")
  report.write_result(json_path, result)
  plot(result, png_path)
  print(f"\nwall time {result['wall_s']:.0f} s; wrote {json_path} and {png_path}", flush=True)
  return result


if __name__ == "__main__":
  cli.guarded(lambda: main(sys.argv[1:]))
