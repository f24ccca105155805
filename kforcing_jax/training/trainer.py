"""The training loop: set up mesh, data and model from a config, then run each stage.

Each stage resumes from its own latest checkpoint when the work dir has one. A notebook can call
`run(config, workdir)` directly; `python -m kforcing_jax.train` is a thin wrapper around it.
"""

import dataclasses
import functools
import math
import os
import time

import jax
import ml_collections
import numpy as np

from kforcing_jax.training import checkpoint
from kforcing_jax.config import check as config_check
from kforcing_jax.distill import targets as distill, losses
from kforcing_jax.diffusion import mdlm as mdlm_lib
from kforcing_jax.observe import metrics_log, plots
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.training import stage_io
from kforcing_jax.training import state as train_state, step as train_step
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


def model_config(config: ml_collections.ConfigDict, tokenizer_vocab: int,
                 mask_id: int) -> model_lib.ModelConfig:
  """The one place a config (and its tokenizer's size and mask id) becomes a ModelConfig:
  model.vocab_size, or the tokenizer's when -1 (it may be larger, never smaller)."""
  m = config.model
  vocab = tokenizer_vocab if m.vocab_size == -1 else m.vocab_size
  if vocab < tokenizer_vocab:
    raise config_check.ConfigError(f"config.model.vocab_size: {vocab} is smaller than the "
                                   f"{config.data.tokenizer} tokenizer's {tokenizer_vocab} ids")
  return model_lib.ModelConfig(
      vocab_size=vocab, mask_id=mask_id if m.mask_token else None, d_model=m.d_model,
      n_layers=m.n_layers, n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, rope_base=m.rope_base,
      dtype=m.dtype, noise_max_freq=float(m.noise_max_freq), norm=m.norm,
      norm_eps=float(m.norm_eps), mlp=m.mlp, mlp_hidden=m.mlp_hidden, n_kv_heads=m.n_kv_heads,
      head_size=m.head_size, tie_embeddings=m.tie_embeddings, qkv_bias=m.qkv_bias,
      head_bias=m.head_bias)


def resolve_model_config(config: ml_collections.ConfigDict,
                         tok: tokenizer_lib.Tokenizer) -> model_lib.ModelConfig:
  return model_config(config, tok.vocab_size, tok.mask_id)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  config_check.validate(config, jax.device_count(), jax.process_count())
  data, model = config_check.mesh_shape(config, jax.device_count())
  mesh = sharding.make_mesh(data, model)
  os.makedirs(workdir, exist_ok=True)
  log.info("processes %d (this is %d), devices %d, mesh data=%d model=%d",
           jax.process_count(), jax.process_index(), jax.device_count(), data, model)
  tok = tokenizer_lib.build_tokenizer(config.data, workdir)
  imported = stage_io.final_stage_meta(workdir, config_check.TEACHER)
  if imported is None:
    model_cfg = resolve_model_config(config, tok)
  else:  # An imported teacher fixes the architecture; config.model.dtype still applies.
    model_cfg = dataclasses.replace(
        model_lib.ModelConfig.from_dict(imported["model_config"]), dtype=config.model.dtype)
    log.info("[teacher] imported from %s: the run uses its architecture (config.model.* other "
             "than dtype does not apply)", imported["converted_from"])
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
  for prev, stage in config_check.chain(stages):
    if stage == config_check.TEACHER and stage_io.final_stage_meta(workdir, stage):
      log.info("[teacher] imported, final: not trained; the next stage starts from it")
      results[stage] = {}
    elif stage in (config_check.TEACHER, config_check.DRAFT):
      results[stage] = run_teacher_stage(s, stage)
    elif stage == config_check.MDLM:
      results[stage] = run_mdlm_stage(s)
    else:
      results[stage] = run_distill_stage(s, stage, prev,
                                         config_check.target_source(stages, stage))
  if jax.process_index() == 0 and os.path.exists(s.writer.path):
    png = os.path.join(workdir, "loss_curve.png")
    plots.plot_loss_curves(s.writer.path, png)
    log.info("wrote %s and %s", s.writer.path, png)
  s.writer.close()
  log.info("all stages done in %.1f s", time.perf_counter() - t0)
  return results


def stage_model_config(config: ml_collections.ConfigDict, model_cfg: model_lib.ModelConfig,
                       stage: str) -> model_lib.ModelConfig:
  """A stage's architecture: the run's, except the draft's width, depth and heads and the
  mdlm's bidirectional attention."""
  if stage == config_check.MDLM:
    return dataclasses.replace(model_cfg, attention="bidirectional")
  if stage != config_check.DRAFT:
    return model_cfg
  d = config.draft
  # Full attention and the default head and MLP widths: the teacher's would not fit its width.
  return dataclasses.replace(model_cfg, d_model=d.d_model, n_layers=d.n_layers,
                             n_heads=d.n_heads, n_kv_heads=0, head_size=0, mlp_hidden=0)


def stage_model(config: ml_collections.ConfigDict, model_cfg: model_lib.ModelConfig, stage: str):
  """(factory, abstract module, graphdef) of a stage's model: AR Transformer or PFLM."""
  factory, abstract = pflm_lib.stage_module(stage_model_config(config, model_cfg, stage),
                                            config_check.stage_k(stage))
  return factory, abstract, model_lib.split_params(abstract)[0]


def _stage_model(s: Setup, stage: str):
  return stage_model(s.config, s.model_cfg, stage)


def ar_loss_fn(graphdef):
  def loss_fn(params, tokens_BxL, key, frozen):
    del key, frozen  # The AR loss is deterministic and has no teacher.
    return losses.next_token_loss(model_lib.merge(graphdef, params), tokens_BxL)
  return loss_fn


def mdlm_specs(config: ml_collections.ConfigDict) -> tuple[mdlm_lib.MdlmSpec, mdlm_lib.MdlmSpec]:
  """(training, validation) masking of the mdlm stage: validation scores whole sequences."""
  return mdlm_lib.MdlmSpec(config.mdlm.prompt_share, config.mdlm.cut_share), mdlm_lib.MdlmSpec()


def run_mdlm_stage(s: Setup) -> dict:
  """Train the masked-diffusion baseline on the data with the MDLM ELBO, from the AR teacher's
  weights (config.mdlm.init_from_teacher) or a fresh init; its validation bound is logged beside
  the teacher's data NLL."""
  stage = config_check.MDLM
  _, _, graphdef = _stage_model(s, stage)
  _, _, ar_graphdef = _stage_model(s, config_check.TEACHER)
  ar_params = load_stage_params(s, config_check.TEACHER)
  train_spec, eval_spec = mdlm_specs(s.config)
  init = None
  if s.config.mdlm.init_from_teacher:
    init = lambda fresh: jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False),
                                      ar_params)
  return run_teacher_stage(s, stage, mdlm_lib.make_loss_fn(train_spec, graphdef), init,
                           reference=(ar_loss_fn(ar_graphdef), ar_params),
                           eval_loss_fn=mdlm_lib.make_loss_fn(eval_spec, graphdef))


def run_teacher_stage(s: Setup, stage: str = config_check.TEACHER, loss_fn=None,
                      init_params=None, **loop_kw) -> dict:
  """Train a model on the data alone: an AR model (the teacher, or the speculative-decoding
  draft) with next-token cross-entropy, or the mdlm with its `loss_fn` and `init_params`
  (run_mdlm_stage); a fresh init's output bias per train.head_bias_init."""
  factory, abstract, graphdef = _stage_model(s, stage)

  @functools.cache  # a new run only (not on resume), once for the params and the EMA
  def counts():
    c = pipeline.unigram_counts(s.config.data, s.tokenizer, workdir=s.workdir,
                                vocab_size=s.model_cfg.vocab_size)
    log.info("[%s] output bias from the unigram frequencies of %s training tokens", stage,
             f"{int(c.sum()):,}")
    return c

  def unigram_bias(fresh: dict) -> dict:
    return model_lib.with_unigram_head_bias(fresh, counts())

  if init_params is None and s.config.train.head_bias_init == "unigram":
    init_params = unigram_bias
  return train_loop(s, stage, factory, abstract, loss_fn or ar_loss_fn(graphdef),
                    init_params=init_params, **loop_kw)


def load_stage_params(s: Setup, stage: str) -> dict:
  """Final weights of a finished stage (its EMA when saved), sharded for the current mesh.

  Parameters only (stage_io.load_stage): the optimizer state stays on disk, so a later stage may
  use different optimizer settings."""
  loaded = stage_io.load_stage(s.workdir, stage, mesh=s.mesh, fsdp=s.config.mesh.fsdp,
                               load_tokenizer=False)
  want = config_check.stage_steps(s.config, stage)
  if loaded.step < want:
    log.warning("[%s] using step %d of %d (the stage is not finished)", stage, loaded.step, want)
  return loaded.params


def run_distill_stage(s: Setup, stage: str, prev: str, target_prev: str | None = None) -> dict:
  """Distil a frozen teacher (the previous stage, or the AR teacher with target ar_rollout)
  into a PFLM(k) that starts from the previous stage's weights. A phase "k<n>_<p>" starts from
  `prev` (phase p - 1) but takes its targets as "k<n>" does, from target_prev (the stage before
  "k<n>"; default prev)."""
  cfg = config_check.stage_config(s.config, stage)
  spec, source = stage_targets(cfg, stage, target_prev or prev)
  _, _, teacher_graphdef = _stage_model(s, source)
  factory, abstract, graphdef = _stage_model(s, stage)
  init_from = load_stage_params(s, prev)
  teacher_params = init_from if source == prev else load_stage_params(s, source)
  loss_fn = distill.make_loss_fn(spec, graphdef, teacher_graphdef)
  # Validation at one temperature (1, or the trained range's nearest), so its lines compare
  # across runs whatever range a stage trains on.
  eval_tau = min(max(1.0, spec.tau_min), spec.tau_max)
  eval_spec = dataclasses.replace(spec, tau_min=eval_tau, tau_max=eval_tau, greedy_share=0.0,
                                  tau_one_share=0.0)
  eval_loss_fn = (loss_fn if eval_spec == spec else
                  distill.make_loss_fn(eval_spec, graphdef, teacher_graphdef))

  def init_params(fresh: dict) -> dict:
    # Copies (not aliases): the student's buffers are donated every step, the teacher's are not.
    copied = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), init_from)
    return pflm_lib.init_from(copied, fresh)

  # The AR teacher's own data NLL: the reference line for the per-offset NLL_j (paper Table 2).
  ar_params = teacher_params if source == config_check.TEACHER else load_stage_params(
      s, config_check.TEACHER)
  _, _, ar_graphdef = _stage_model(s, config_check.TEACHER)
  # Drift along the chain: the student's per-offset NLL / accuracy against the ORIGINAL AR
  # teacher's k-round inverse-CDF targets (equal to the stage's own metrics right after the
  # teacher with self-forcing targets; logged for every stage so runs compare line by line).
  ar_spec = dataclasses.replace(eval_spec, teacher_k=0, target="self_forcing", own_prefix=0.0)
  same = ar_spec == eval_spec  # then val_ar_* = val_*: copied, not recomputed
  ar_targets = (None if same else distill.make_loss_fn(ar_spec, graphdef, ar_graphdef),
                ar_params)
  return train_loop(s, stage, factory, abstract, loss_fn, frozen=teacher_params,
                    init_params=init_params, reference=(ar_loss_fn(ar_graphdef), ar_params),
                    ar_targets=ar_targets, eval_loss_fn=eval_loss_fn)


def stage_targets(cfg: ml_collections.ConfigDict, stage: str, target_prev: str):
  """(spec, the stage whose frozen weights make the targets) of a PFLM stage under cfg, for the
  trainer and the dry run alike; a phase "k<n>_<p>" makes the targets "k<n>" makes."""
  return distill.stage_spec(config_check.base_stage(stage), target_prev, cfg.distill.target,
                            (cfg.distill.tau_min, cfg.distill.tau_max, cfg.distill.greedy_share,
                             cfg.distill.tau_one_share),
                            cfg.distill.cdf_blur, cfg.distill.own_prefix)


def _finite_or_raise(stage: str, step: int, m: dict, last_saved: int | None) -> None:
  bad = {k: m[k] for k in ("loss", "grad_norm") if not math.isfinite(m[k])}
  if bad:
    where = (f"the latest good checkpoint (step {last_saved}) is untouched" if last_saved
             else "no checkpoint was written for this stage")
    raise FloatingPointError(
        f"[{stage}] non-finite {bad} at step {step}; stopping without saving ({where}). "
        f"Lower config.optim.lr or enable config.optim.grad_clip.")


def train_loop(s: Setup, stage: str, factory, abstract, loss_fn, frozen=(), init_params=None,
               reference=None, ar_targets=None, eval_loss_fn=None) -> dict:
  """Generic loop: init or resume, step with pipelined metric fetches, eval, checkpoint.

  frozen: teacher params passed to every step (no gradient). init_params: maps fresh params to
  the stage's starting params. reference: (loss_fn, params) of the AR teacher, whose validation
  loss is logged beside this stage's as `val_teacher_data_nll`. ar_targets: (loss_fn, params)
  scoring the student against the AR teacher's own targets, logged as `val_ar_*` (loss_fn None:
  the stage's own targets are the AR teacher's, so its val_* metrics are copied).
  eval_loss_fn: the validation loss when it differs from the training loss (default loss_fn).
  """
  cfg, mesh = config_check.stage_config(s.config, stage), s.mesh
  tcfg = cfg.train
  num_steps = config_check.stage_steps(cfg, stage)
  parts = train_step.assemble(cfg.optim, num_steps, abstract, mesh, cfg.mesh.fsdp, loss_fn,
                              frozen, cfg.seed)
  eval_fn = train_step.make_eval_step(eval_loss_fn or loss_fn, parts.state_sh["params"],
                                      parts.batch_sh,
                                      parts.metrics_sh, parts.frozen_sh)

  pidx, pcount = jax.process_index(), jax.process_count()
  data_kw = dict(seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, workdir=s.workdir,
                 process_index=pidx, process_count=pcount)
  it = pipeline.make_train_iterator(cfg.data, s.tokenizer, seed=cfg.seed, **data_kw)
  eval_batches = [sharding.global_batch(b, mesh) for b in pipeline.make_eval_batches(
      cfg.data, s.tokenizer, num_batches=tcfg.eval_batches, **data_kw)]

  ckpt = checkpoint.Checkpointer(stage_dir(s.workdir, stage), keep=tcfg.keep_checkpoints)
  meta = {"model_config": dataclasses.asdict(stage_model_config(cfg, s.model_cfg, stage)),
          "stage": stage,
          "config": cfg.to_dict()}
  state, latest = _resume_or_init(s, stage, cfg, ckpt, parts, factory, it, init_params)
  start = int(state["step"])
  validate = _Validation(s, stage, parts, eval_fn, eval_batches, frozen, reference, ar_targets)
  train_log = _TrainMetrics(s, stage, num_steps, start, tcfg.log_every,
                            cfg.batch_size * cfg.seq_len, latest)
  t_start = time.perf_counter()
  last_val = {}

  for step in range(start, num_steps):
    batch = sharding.global_batch(next(it), mesh)
    state, metrics = parts.step_fn(state, batch, frozen)
    train_log.drain()
    train_log.pending = (step + 1, metrics)
    done = step + 1
    is_last = done == num_steps
    if done % tcfg.eval_every == 0 or done % tcfg.ckpt_every == 0 or is_last:
      train_log.drain()  # A checkpoint is only written after its step's loss is known finite.
      if done % tcfg.eval_every == 0 or is_last:
        last_val = validate(state, done, t_start)
      if done % tcfg.ckpt_every == 0 or is_last:
        ckpt.save(done, state, meta, data_iter=it)
        train_log.last_saved = done
  train_log.drain()
  if start >= num_steps:
    log.info("[%s] already complete at step %d", stage, start)
  else:
    wall = time.perf_counter() - t_start
    tokens = (num_steps - start) * cfg.batch_size * cfg.seq_len
    log.info("[%s] %d steps in %.1f s (%.0f tokens/s overall)", stage, num_steps - start,
             wall, tokens / wall)
  ckpt.close()
  return {"state": state, "train": train_log.last, "val": last_val}


def _resume_or_init(s: Setup, stage: str, cfg, ckpt: checkpoint.Checkpointer, parts, factory,
                    it, init_params):
  """(state, latest step): the stage's latest checkpoint restored (the data iterator `it` with
  it), or (a fresh state, None), its params mapped through init_params when given."""
  latest = ckpt.latest_step()
  if latest is not None:
    shapes = train_state.state_shapes(factory, parts.tx, parts.ema)
    state, _ = ckpt.restore(latest, train_state.abstract_state(shapes, parts.state_sh), it)
    s.writer.drop_after(stage, latest)
    log.info("[%s] resumed from step %d (%s)", stage, latest, ckpt.directory)
  else:
    state = train_state.init_state(factory, parts.tx, parts.state_sh, cfg.seed, parts.ema)
    if init_params is not None:
      state["params"] = init_params(state["params"])
      if parts.ema:
        state["ema"] = init_params(state["ema"])
    log.info("[%s] new run: %s parameters", stage,
             f"{model_lib.count_params(state['params']):,}")
  return state, latest


class _Validation:
  """A stage's validation metrics: val_* of its params (and val_ema_* of its EMA), val_ar_*
  against the AR teacher's own targets, and the teacher's val_teacher_data_nll."""

  def __init__(self, s: Setup, stage: str, parts, eval_fn, eval_batches, frozen, reference,
               ar_targets):
    self.s, self.stage, self.ema, self.eval_fn = s, stage, parts.ema, eval_fn
    self.eval_batches, self.frozen, self.ar_targets = eval_batches, frozen, ar_targets
    batch_sh, rep = parts.batch_sh, parts.metrics_sh
    self.ref_nll = None
    if reference is not None:
      ref_eval = train_step.make_eval_step(
          reference[0], jax.tree.map(lambda x: x.sharding, reference[1]), batch_sh, rep)
      self.ref_nll = float(np.mean([float(ref_eval(reference[1], b, i)["loss"])
                                    for i, b in enumerate(eval_batches)]))
    self.ar_eval = None
    if ar_targets is not None and ar_targets[0] is not None:
      self.ar_eval = train_step.make_eval_step(
          ar_targets[0], parts.state_sh["params"], batch_sh, rep,
          jax.tree.map(lambda x: x.sharding, ar_targets[1]))

  def _mean_metrics(self, fn, params, frozen) -> dict:
    ms = [jax.device_get(fn(params, b, i, frozen)) for i, b in enumerate(self.eval_batches)]
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}

  def __call__(self, state: dict, step: int, t_start: float) -> dict:
    """Evaluate `state` at `step`; writes the metrics line (elapsed since t_start) and logs it."""
    out = {}
    for name in ("params", "ema") if self.ema else ("params",):
      prefix = "val_" if name == "params" else "val_ema_"
      out.update({prefix + k: v for k, v in
                  self._mean_metrics(self.eval_fn, state[name], self.frozen).items()})
    # val_ar_* scores the weights the stage hands on: its EMA when kept, else its params.
    handed_on = "ema" if self.ema else "params"
    if self.ar_eval is not None:
      out.update({"val_ar_" + k: v for k, v in self._mean_metrics(
          self.ar_eval, state[handed_on], self.ar_targets[1]).items()})
    elif self.ar_targets is not None:
      src = "val_ema_" if self.ema else "val_"
      out.update({"val_ar_" + k[len(src):]: v for k, v in list(out.items())
                  if k.startswith(src)})
    if self.ref_nll is not None:
      out["val_teacher_data_nll"] = self.ref_nll
    self.s.writer.write({"stage": self.stage, "step": step, **out,
                         "elapsed_s": time.perf_counter() - t_start})
    log.info("[%s] step %d validation %s", self.stage, step,
             " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


class _TrainMetrics:
  """Pipelined train metrics: step t's `pending` device metrics are fetched (`drain`) after step
  t + 1 is dispatched, so the host never stalls the device; each is checked finite, and logged
  every log_every steps (and at the first and last step)."""

  def __init__(self, s: Setup, stage: str, num_steps: int, start: int, log_every: int,
               tokens_per_step: int, last_saved: int | None):
    self.s, self.stage, self.num_steps, self.start = s, stage, num_steps, start
    self.log_every, self.tokens_per_step, self.last_saved = log_every, tokens_per_step, last_saved
    self.progress = metrics_log.Progress(num_steps, start=start)
    self.pending = None  # (step, device metrics)
    self.last: dict = {}

  def drain(self) -> None:
    if self.pending is None:
      return
    step, dev_metrics = self.pending
    self.pending = None
    m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    _finite_or_raise(self.stage, step, m, self.last_saved)
    self.last = m
    if step % self.log_every == 0 or step == self.num_steps or step == self.start + 1:
      p = self.progress.tick(step)
      m.update(tokens_per_s=p["per_s"] * self.tokens_per_step, steps_per_s=p["per_s"],
               eta_s=p["eta_s"], elapsed_s=p["elapsed_s"])
      self.s.writer.write({"stage": self.stage, "step": step, **m})
      log.info(self.progress.line(f"[{self.stage}] step", step,
                                  f"loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s",
                                  p["eta_s"]))
