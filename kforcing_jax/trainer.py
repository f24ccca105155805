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

from kforcing_jax import checkpoint, config_check, losses, metrics_log, optimizer, plots
from kforcing_jax import model as model_lib
from kforcing_jax import sharding, train_state, train_step
from kforcing_jax.data import pipeline, tokenizer as tokenizer_lib

log = metrics_log.log


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
  for stage in config_check.parse_stages(config.stages):
    results[stage] = run_teacher_stage(s)
  if jax.process_index() == 0 and os.path.exists(s.writer.path):
    png = os.path.join(workdir, "loss_curve.png")
    plots.plot_loss_curves(s.writer.path, png)
    log.info("wrote %s and %s", s.writer.path, png)
  log.info("all stages done in %.1f s", time.perf_counter() - t0)
  return results


def run_teacher_stage(s: Setup, stage: str = "teacher") -> dict:
  """Train the AR teacher with next-token cross-entropy."""
  cfg = s.config
  factory = lambda rngs: model_lib.Transformer(s.model_cfg, rngs)
  abstract = model_lib.abstract_model(s.model_cfg)
  graphdef, _ = model_lib.split_params(abstract)

  def loss_fn(params, tokens_BxL, key):
    del key  # The AR loss is deterministic.
    return losses.next_token_loss(model_lib.merge(graphdef, params), tokens_BxL)

  return train_loop(s, stage, factory, abstract, loss_fn)


def _finite_or_raise(stage: str, step: int, m: dict, last_saved: int | None) -> None:
  bad = {k: m[k] for k in ("loss", "grad_norm") if not math.isfinite(m[k])}
  if bad:
    where = (f"the latest good checkpoint (step {last_saved}) is untouched" if last_saved
             else "no checkpoint was written for this stage")
    raise FloatingPointError(
        f"[{stage}] non-finite {bad} at step {step}; stopping without saving ({where}). "
        f"Lower config.optim.lr or enable config.optim.grad_clip.")


def train_loop(s: Setup, stage: str, factory, abstract, loss_fn) -> dict:
  """Generic loop: init or resume, step with pipelined metric fetches, eval, checkpoint."""
  cfg, mesh = s.config, s.mesh
  tcfg = cfg.train
  tx = optimizer.make_optimizer(cfg.optim, tcfg.num_steps)
  schedule = optimizer.lr_schedule(cfg.optim, tcfg.num_steps)
  ema = cfg.optim.ema_decay > 0
  state_sh = train_state.state_shardings(abstract, tx, mesh, cfg.mesh.fsdp, ema)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step_fn = train_step.make_train_step(loss_fn, tx, schedule, cfg.optim.ema_decay, cfg.seed,
                                       state_sh, batch_sh, rep)
  eval_fn = train_step.make_eval_step(loss_fn, state_sh["params"], batch_sh, rep)

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
    log.info("[%s] new run: %s parameters", stage,
             f"{model_lib.count_params(state['params']):,}")
  start = int(state["step"])
  last_saved = latest

  def evaluate(step: int) -> dict:
    out = {}
    for name in ("params", "ema") if ema else ("params",):
      ms = [jax.device_get(eval_fn(state[name], b)) for b in eval_batches]
      prefix = "val_" if name == "params" else "val_ema_"
      out.update({prefix + k: float(np.mean([m[k] for m in ms])) for k in ms[0]})
    s.writer.write({"stage": stage, "step": step, **out})
    log.info("[%s] step %d validation %s", stage, step,
             " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out

  progress = metrics_log.Progress(stage, start, tcfg.num_steps, cfg.batch_size * cfg.seq_len)
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
    if step % tcfg.log_every == 0 or step == tcfg.num_steps or step == start + 1:
      m.update(progress.tick(step))
      s.writer.write({"stage": stage, "step": step, **m})
      log.info(progress.line(step, m))

  for step in range(start, tcfg.num_steps):
    batch = sharding.global_batch(next(it), mesh)
    state, metrics = step_fn(state, batch)
    drain()
    pending = (step + 1, metrics)
    done = step + 1
    is_last = done == tcfg.num_steps
    if done % tcfg.eval_every == 0 or done % tcfg.ckpt_every == 0 or is_last:
      drain()  # A checkpoint is only written after its step's loss is known to be finite.
      if done % tcfg.eval_every == 0 or is_last:
        last_val = evaluate(done)
      if done % tcfg.ckpt_every == 0 or is_last:
        ckpt.save(done, state, meta, data_iter=it)
        last_saved = done
  drain()
  if start >= tcfg.num_steps:
    log.info("[%s] already complete at step %d", stage, start)
  else:
    wall = time.perf_counter() - t_start
    tokens = (tcfg.num_steps - start) * cfg.batch_size * cfg.seq_len
    log.info("[%s] %d steps in %.1f s (%.0f tokens/s overall)", stage, tcfg.num_steps - start,
             wall, tokens / wall)
  ckpt.close()
  return {"state": state, "train": last_train, "val": last_val}
