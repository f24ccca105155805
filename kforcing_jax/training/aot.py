"""Dry run: compile every stage's train step ahead of time for a big mesh, without the hardware.

`python -m kforcing_jax.train --config configs/lm1b.py --workdir DIR --dry_run` creates
`--dry_run_devices` (32) fake CPU devices, builds the config's ('data', 'model') mesh over them
and, for each stage of `config.stages`, lowers and compiles the SAME jitted train step the
trainer runs (same loss, shardings and donation) on abstract inputs: no parameter is allocated
and no data or tokenizer is touched (the vocabulary comes from the config or the tokenizer's
known size). It prints parameter counts and XLA's per-device memory and FLOP estimates, and a
bad mesh fails on the config check with the field to change, before any compile.

Figures come from the CPU compiler: per-device argument/output sizes are exact (they follow
the shardings), temporaries and FLOPs are indicative of what a TPU/GPU compile will need.
"""

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from kforcing_jax.config import check as config_check
from kforcing_jax.data import tokenizer as tokenizer_lib
from kforcing_jax.distill import targets as distill
from kforcing_jax.diffusion import mdlm as mdlm_lib
from kforcing_jax.observe import metrics_log, report
from kforcing_jax.training import state as train_state
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.training import step as train_step, trainer

log = metrics_log.log
GIB = 2.0**30


@dataclasses.dataclass
class StageReport:
  """What compiling one stage's train step showed; memory figures are per device."""
  stage: str
  params: int
  param_groups: dict
  state_bytes_per_device: int  # params + optimizer moments (+ EMA) after sharding
  frozen_bytes_per_device: int  # the distillation teacher's params
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # donated inputs reused as outputs
  temp_bytes: int
  peak_bytes_estimate: int  # arguments + outputs - aliased + temporaries
  flops_per_step: float  # all devices together
  lower_s: float
  compile_s: float


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The architecture from the config alone (no tokenizer is built): the tokenizer's known size."""
  d = config.data
  if config.model.vocab_size != -1 and not config.model.mask_token:  # an imported model's
    return trainer.model_config(config, config.model.vocab_size, None)
  if d.tokenizer == "bpe":
    vocab, mask = d.bpe_vocab_size, tokenizer_lib.BPE_MASK_ID
  else:
    vocab, mask = tokenizer_lib.KNOWN_SIZES[d.tokenizer]
  return trainer.model_config(config, vocab, mask)


def param_groups(params: dict) -> dict[str, int]:
  """Parameter counts by part: token embedding, blocks, output layer, noise encoder."""
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  groups = {"embedding": count(params["vocab_embed"]), "blocks": count(params["blocks"]),
            "output_layer": count([params[k] for k in ("norm_final", "head", "head_bias")
                                   if k in params])}
  if "noise_encoder" in params:
    groups["noise_encoder"] = count(params["noise_encoder"])
  return groups


def _per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of ShapeDtypeStructs carrying NamedShardings."""
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    total += jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
  return total


def compile_stage(config: ml_collections.ConfigDict, model_cfg: model_lib.ModelConfig,
                  mesh: jax.sharding.Mesh, stage: str, prev: str | None) -> StageReport:
  """Lower + compile the trainer's train step of `stage` on abstract inputs; prev: the stage
  whose weights `stage` would make its targets from (config_check.target_source)."""
  cfg = config_check.stage_config(config, stage)  # what the trainer compiles for this stage
  num_steps = config_check.stage_steps(cfg, stage)
  factory, abstract, graphdef = trainer.stage_model(cfg, model_cfg, stage)
  if stage == config_check.MDLM:
    loss_fn, frozen = mdlm_lib.make_loss_fn(trainer.mdlm_specs(cfg)[0], graphdef), ()
  elif config_check.stage_k(stage) == 0:  # the teacher or the draft
    loss_fn, frozen = trainer.ar_loss_fn(graphdef), ()
  else:
    spec, source = trainer.stage_targets(cfg, stage, prev)
    _, teacher_abstract, _ = trainer.stage_model(cfg, model_cfg, source)
    teacher_graphdef, teacher_shapes = model_lib.split_params(teacher_abstract)
    frozen = sharding.abstract_arrays(
        teacher_shapes, sharding.param_shardings(teacher_abstract, mesh, cfg.mesh.fsdp))
    loss_fn = distill.make_loss_fn(spec, graphdef, teacher_graphdef)
  parts = train_step.assemble(cfg.optim, num_steps, abstract, mesh, cfg.mesh.fsdp, loss_fn,
                              frozen, cfg.seed)
  step_fn = parts.step_fn
  state = train_state.abstract_state(train_state.state_shapes(factory, parts.tx, parts.ema),
                                     parts.state_sh)
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=parts.batch_sh)
  t0 = time.perf_counter()
  lowered = step_fn.jitted.lower(state, batch, frozen)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0)) * mesh.size
  args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  return StageReport(
      stage=stage, params=model_lib.count_params(state["params"]),
      param_groups=param_groups(state["params"]),
      state_bytes_per_device=_per_device_bytes(state),
      frozen_bytes_per_device=_per_device_bytes(frozen), argument_bytes=args,
      output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      peak_bytes_estimate=args + out - alias + temp, flops_per_step=flops,
      lower_s=t1 - t0, compile_s=t2 - t1)


def dry_run(config: ml_collections.ConfigDict, workdir: str, n_devices: int) -> list[StageReport]:
  """Check and compile every stage for an n_devices mesh; print a table, write dry_run.json."""
  config_check.validate(config, n_devices)  # A bad mesh fails here, naming the field.
  if jax.device_count() < n_devices:
    raise RuntimeError(
        f"the dry run needs {n_devices} devices but jax has {jax.device_count()}; run it as "
        f"`python -m kforcing_jax.train --dry_run --dry_run_devices={n_devices}` (which creates "
        f"fake CPU devices) or set XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{n_devices} before jax is imported")
  data, model = config_check.mesh_shape(config, n_devices)
  mesh = sharding.make_mesh(data, model, devices=jax.devices()[:n_devices])
  model_cfg = model_config(config)
  stages = config_check.parse_stages(config.stages)
  log.info("[dry run] %d devices, mesh data=%d model=%d, global batch %d x %d tokens, vocab %d, "
           "stages %s", n_devices, data, model, config.batch_size, config.seq_len,
           model_cfg.vocab_size, ",".join(stages))
  reports = []
  t0 = time.perf_counter()
  for i, (prev, stage) in enumerate(config_check.chain(stages)):
    log.info("[dry run] compiling the %s train step (%d/%d)...", stage, i + 1, len(stages))
    reports.append(compile_stage(config, model_cfg, mesh, stage,
                                 config_check.target_source(stages, stage)))
    r = reports[-1]
    log.info("[dry run] %s: lowered in %.1f s, compiled in %.1f s", stage, r.lower_s,
             r.compile_s)
  print(format_report(reports, n_devices, (data, model)))
  log.info("[dry run] all %d stages compiled in %.1f s", len(stages), time.perf_counter() - t0)
  if workdir:
    path = os.path.join(workdir, "dry_run.json")
    report.write_result(path, {"devices": n_devices, "mesh": {"data": data, "model": model},
                               "model_config": dataclasses.asdict(model_cfg),
                               "config": config.to_dict(),
                               "stages": [dataclasses.asdict(r) for r in reports]}, indent=2)
    log.info("[dry run] wrote %s", path)
  return reports


def format_report(reports: list[StageReport], n_devices: int, mesh_shape: tuple) -> str:
  """Parameter counts by part, then one row per stage of per-device memory (GiB)."""
  m = lambda n: f"{n / 1e6:.1f}M"
  g = lambda b: f"{b / GIB:.2f}"
  lines = [f"Dry run on {n_devices} fake CPU devices, mesh data={mesh_shape[0]} "
           f"model={mesh_shape[1]} (memory per device, GiB; CPU-compiler estimates)"]
  for r in reports:
    parts = ", ".join(f"{k} {m(v)}" for k, v in r.param_groups.items())
    lines.append(f"  {r.stage:8s} {r.params:>13,d} params ({parts})")
  head = (f"{'stage':8s} {'state':>7s} {'teacher':>8s} {'args':>7s} {'outputs':>8s} "
          f"{'donated':>8s} {'temp':>7s} {'peak~':>7s} {'TFLOP/step':>11s} {'compile s':>10s}")
  lines += [head, "-" * len(head)]
  for r in reports:
    lines.append(f"{r.stage:8s} {g(r.state_bytes_per_device):>7s} "
                 f"{g(r.frozen_bytes_per_device):>8s} {g(r.argument_bytes):>7s} "
                 f"{g(r.output_bytes):>8s} {g(r.alias_bytes):>8s} {g(r.temp_bytes):>7s} "
                 f"{g(r.peak_bytes_estimate):>7s} {r.flops_per_step / 1e12:>11.1f} "
                 f"{r.lower_s + r.compile_s:>10.1f}")
  return "\n".join(lines)
