"""The training loop: set up mesh, data and model from a config, then run each stage.

Each stage resumes from its own latest checkpoint when the work dir has one. A notebook can call
`run(config, workdir)` directly; `python -m kforcing_jax.train` is a thin wrapper around it.
"""

import dataclasses
import math
import os
import time

import jax
import ml_collections
import numpy as np

from kforcing_jax import checkpoint, config_check, distill, losses, metrics_log, optimizer, plots
from kforcing_jax import model as model_lib
from kforcing_jax import pflm as pflm_lib
from kforcing_jax import sharding, train_state, train_step
from kforcing_jax.data import pipeline, tokenizer as tokenizer_lib

log = metrics_log.log
configure_logging = metrics_log.configure_logging


@dataclasses.dataclass
class Setup:
  """Everything a stage needs that does not depend on the stage."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: tokenizer_lib.Tokenizer
  model_cfg: model_lib.ModelConfig
  writer: metrics_log.MetricsWriter


def resolve_model_config(config: ml_collections.ConfigDict,
                         tok: tokenizer_lib.Tokenizer) -> model_lib.ModelConfig:
  m = config.model
  vocab = tok.vocab_size if m.vocab_size == -1 else m.vocab_size
  if vocab < tok.vocab_size:
    raise config_check.ConfigError(
        f"config.model.vocab_size: {vocab} is smaller than the tokenizer's {tok.vocab_size}")
  return model_lib.ModelConfig(vocab_size=vocab, mask_id=tok.mask_id, d_model=m.d_model,
                               n_layers=m.n_layers, n_heads=m.n_heads, mlp_ratio=m.mlp_ratio,
                               rope_base=m.rope_base, dtype=m.dtype)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  config_check.validate(config, jax.device_count(), jax.process_count())
  data, model = config_check.mesh_shape(config, jax.device_count())
  mesh = sharding.make_mesh(data, model)
  os.makedirs(workdir, exist_ok=True)
  log.info("processes %d (this is %d), devices %d, mesh data=%d model=%d",
           jax.process_count(), jax.process_index(), jax.device_count(), data, model)
  tok = tokenizer_lib.build_tokenizer(config.data, workdir)
  model_cfg = resolve_model_config(config, tok)
  writer = metrics_log.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  return Setup(config, workdir, mesh, tok, model_cfg, writer)


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "checkpoints", stage)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run every stage of `config.stages`; returns {stage: final metrics}."""
  t0 = time.perf_counter()
  s = setup(config, workdir)
  results = {}
  stages = config_check.parse_stages(config.stages)
  for prev, stage in zip([None] + stages, stages):
    if stage == config_check.TEACHER:
      results[stage] = run_teacher_stage(s)
    else:
      results[stage] = run_distill_stage(s, stage, prev)
  if jax.process_index() == 0 and os.path.exists(s.writer.path):
    png = os.path.join(workdir, "loss_curve.png")
    plots.plot_loss_curves(s.writer.path, png)
    log.info("wrote %s and %s", s.writer.path, png)
  s.writer.close()
  log.info("all stages done in %.1f s", time.perf_counter() - t0)
  return results


def _stage_model(s: Setup, stage: str):
  """(factory, abstract module, graphdef) of a stage's model: AR Transformer or PFLM."""
  cls = model_lib.Transformer if stage == config_check.TEACHER else pflm_lib.PFLM
  factory = lambda rngs: cls(s.model_cfg, rngs)
  abstract = (model_lib.abstract_model(s.model_cfg) if cls is model_lib.Transformer
              else pflm_lib.abstract_pflm(s.model_cfg))
  return factory, abstract, model_lib.split_params(abstract)[0]


def ar_loss_fn(graphdef):
  def loss_fn(params, tokens_BxL, key, frozen):
    del key, frozen  # The AR loss is deterministic and has no teacher.
    return losses.next_token_loss(model_lib.merge(graphdef, params), tokens_BxL)
  return loss_fn


def run_teacher_stage(s: Setup, stage: str = config_check.TEACHER) -> dict:
  """Train the AR teacher with next-token cross-entropy."""
  factory, abstract, graphdef = _stage_model(s, stage)
  return train_loop(s, stage, factory, abstract, ar_loss_fn(graphdef))


def load_stage_params(s: Setup, stage: str) -> dict:
  """Final weights of a finished stage (its EMA when EMA is on), sharded for the current mesh."""
  cfg = s.config
  factory, abstract, _ = _stage_model(s, stage)
  ckpt = checkpoint.Checkpointer(stage_dir(s.workdir, stage))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"stage {stage!r} has no checkpoint in {ckpt.directory}")
  want = config_check.stage_steps(cfg, stage)
  if step < want:
    log.warning("[%s] using step %d of %d (the stage is not finished)", stage, step, want)
  ema = cfg.optim.ema_decay > 0
  tx = optimizer.make_optimizer(cfg.optim, want)
  state_sh = train_state.state_shardings(abstract, tx, s.mesh, cfg.mesh.fsdp, ema)
  target = train_state.abstract_state(train_state.state_shapes(factory, tx, ema), state_sh)
  state, _ = ckpt.restore(step, target)
  ckpt.close()
  return state["ema"] if ema else state["params"]


def run_distill_stage(s: Setup, stage: str, prev: str) -> dict:
  """Distil the frozen previous stage into a PFLM(k) that starts from its weights."""
  cfg = s.config
  spec = distill.StageSpec(student_k=config_check.stage_k(stage),
                           teacher_k=config_check.stage_k(prev), target=cfg.distill.target,
                           tau=cfg.distill.tau)
  _, _, teacher_graphdef = _stage_model(s, prev)
  factory, abstract, graphdef = _stage_model(s, stage)
  teacher_params = load_stage_params(s, prev)
  loss_fn = distill.make_loss_fn(spec, graphdef, teacher_graphdef)

  def init_params(fresh: dict) -> dict:
    # Copies (not aliases): the student's buffers are donated every step, the teacher's are not.
    copied = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False),
                          teacher_params)
    return pflm_lib.init_from(copied, fresh)

  # The AR teacher's own data NLL: the reference line for the per-offset NLL_j (paper Table 2).
  ar_params = teacher_params if prev == config_check.TEACHER else load_stage_params(
      s, config_check.TEACHER)
  _, _, ar_graphdef = _stage_model(s, config_check.TEACHER)
  return train_loop(s, stage, factory, abstract, loss_fn, frozen=teacher_params,
                    init_params=init_params, reference=(ar_loss_fn(ar_graphdef), ar_params))


def _finite_or_raise(stage: str, step: int, m: dict, last_saved: int | None) -> None:
  bad = {k: m[k] for k in ("loss", "grad_norm") if not math.isfinite(m[k])}
  if bad:
    where = (f"the latest good checkpoint (step {last_saved}) is untouched" if last_saved
             else "no checkpoint was written for this stage")
    raise FloatingPointError(
        f"[{stage}] non-finite {bad} at step {step}; stopping without saving ({where}). "
        f"Lower config.optim.lr or enable config.optim.grad_clip.")


def train_loop(s: Setup, stage: str, factory, abstract, loss_fn, frozen=(), init_params=None,
               reference=None) -> dict:
  """Generic loop: init or resume, step with pipelined metric fetches, eval, checkpoint.

  frozen: teacher params passed to every step (no gradient). init_params: maps fresh params to
  the stage's starting params. reference: (loss_fn, params) of the AR teacher, whose validation
  loss is logged beside this stage's as `val_teacher_data_nll`.
  """
  cfg, mesh = s.config, s.mesh
  tcfg = cfg.train
  num_steps = config_check.stage_steps(cfg, stage)
  tx = optimizer.make_optimizer(cfg.optim, num_steps)
  schedule = optimizer.lr_schedule(cfg.optim, num_steps)
  ema = cfg.optim.ema_decay > 0
  state_sh = train_state.state_shardings(abstract, tx, mesh, cfg.mesh.fsdp, ema)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = train_step.make_train_step(loss_fn, tx, schedule, cfg.optim.ema_decay, cfg.seed,
                                       state_sh, batch_sh, rep, frozen_sh)
  eval_fn = train_step.make_eval_step(loss_fn, state_sh["params"], batch_sh, rep, frozen_sh)

  pidx, pcount = jax.process_index(), jax.process_count()
  data_kw = dict(seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, workdir=s.workdir,
                 process_index=pidx, process_count=pcount)
  it = pipeline.make_train_iterator(cfg.data, s.tokenizer, seed=cfg.seed, **data_kw)
  eval_batches = [sharding.global_batch(b, mesh) for b in pipeline.make_eval_batches(
      cfg.data, s.tokenizer, num_batches=tcfg.eval_batches, **data_kw)]

  ckpt = checkpoint.Checkpointer(stage_dir(s.workdir, stage), keep=tcfg.keep_checkpoints)
  meta = {"model_config": dataclasses.asdict(s.model_cfg), "stage": stage,
          "config": cfg.to_dict()}
  latest = ckpt.latest_step()
  if latest is not None:
    shapes = train_state.state_shapes(factory, tx, ema)
    state, _ = ckpt.restore(latest, train_state.abstract_state(shapes, state_sh), it)
    s.writer.drop_after(stage, latest)
    log.info("[%s] resumed from step %d (%s)", stage, latest, ckpt.directory)
  else:
    state = train_state.init_state(factory, tx, state_sh, cfg.seed, ema)
    if init_params is not None:
      state["params"] = init_params(state["params"])
      if ema:
        state["ema"] = init_params(state["ema"])
    log.info("[%s] new run: %s parameters", stage,
             f"{model_lib.count_params(state['params']):,}")
  start = int(state["step"])
  last_saved = latest

  ref_nll = None
  if reference is not None:
    ref_eval = train_step.make_eval_step(
        reference[0], jax.tree.map(lambda x: x.sharding, reference[1]), batch_sh, rep)
    ref_nll = float(np.mean([float(ref_eval(reference[1], b, i)["loss"])
                             for i, b in enumerate(eval_batches)]))

  def evaluate(step: int) -> dict:
    out = {}
    for name in ("params", "ema") if ema else ("params",):
      ms = [jax.device_get(eval_fn(state[name], b, i, frozen))
            for i, b in enumerate(eval_batches)]
      prefix = "val_" if name == "params" else "val_ema_"
      out.update({prefix + k: float(np.mean([m[k] for m in ms])) for k in ms[0]})
    if ref_nll is not None:
      out["val_teacher_data_nll"] = ref_nll
    s.writer.write({"stage": stage, "step": step, **out})
    log.info("[%s] step %d validation %s", stage, step,
             " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out

  progress = metrics_log.Progress(stage, start, num_steps, cfg.batch_size * cfg.seq_len)
  t_start = time.perf_counter()
  last_train, last_val = {}, {}
  pending = None  # (step, device metrics): fetched after the next step is dispatched.

  def drain():
    nonlocal pending, last_train
    if pending is None:
      return
    step, dev_metrics = pending
    pending = None
    m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    _finite_or_raise(stage, step, m, last_saved)
    last_train = m
    if step % tcfg.log_every == 0 or step == num_steps or step == start + 1:
      m.update(progress.tick(step))
      s.writer.write({"stage": stage, "step": step, **m})
      log.info(progress.line(step, m))

  for step in range(start, num_steps):
    batch = sharding.global_batch(next(it), mesh)
    state, metrics = step_fn(state, batch, frozen)
    drain()
    pending = (step + 1, metrics)
    done = step + 1
    is_last = done == num_steps
    if done % tcfg.eval_every == 0 or done % tcfg.ckpt_every == 0 or is_last:
      drain()  # A checkpoint is only written after its step's loss is known to be finite.
      if done % tcfg.eval_every == 0 or is_last:
        last_val = evaluate(done)
      if done % tcfg.ckpt_every == 0 or is_last:
        ckpt.save(done, state, meta, data_iter=it)
        last_saved = done
  drain()
  if start >= num_steps:
    log.info("[%s] already complete at step %d", stage, start)
  else:
    wall = time.perf_counter() - t_start
    tokens = (num_steps - start) * cfg.batch_size * cfg.seq_len
    log.info("[%s] %d steps in %.1f s (%.0f tokens/s overall)", stage, num_steps - start,
             wall, tokens / wall)
  ckpt.close()
  return {"state": state, "train": last_train, "val": last_val}
