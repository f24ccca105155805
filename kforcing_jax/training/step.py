"""Jitted train / eval steps with explicit in/out shardings and donation of the train state.

`loss_fn(params, batch, key, frozen) -> (loss, aux_metrics)` is the only stage-specific piece;
the AR teacher and every distillation stage share this step. `frozen` holds tensors that are read
but never trained (the distillation teacher): an explicit jit argument, not a baked-in constant,
with its own shardings, no gradient and no optimizer state.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# loss_fn(params, batch, key, frozen) -> (loss, aux metrics)
LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict]]


def ema_decay_at(ema_decay: float, step: jax.Array) -> jax.Array:
  """EMA decay for the update after `step`: min(ema_decay, (1 + step) / (10 + step)).

  The warm-up keeps a stage's starting weights (its predecessor's, which ignore the noise) from
  lingering in the average: with a flat 0.999 they would still weigh 0.999^2400 = 9% after a
  2400-step stage; the paper's 500K-step stages never notice."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float, seed: int, state_sh, batch_sh, metrics_sh, frozen_sh=()):
  """Returns step(state, batch, frozen=()) -> (state, metrics); the input state is donated."""
  base_key = jax.random.key(seed)

  def step(state, batch, frozen):
    key = jax.random.fold_in(base_key, state["step"])  # rngs come from the step, not Python.
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key,
                                                                   frozen)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
      decay = ema_decay_at(ema_decay, state["step"])
      new["ema"] = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                                state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": jnp.asarray(schedule(state["step"]), jnp.float32), **aux}
    return new, metrics

  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh),
                   out_shardings=(state_sh, metrics_sh), donate_argnums=0)
  step_fn = lambda state, batch, frozen=(): jitted(state, batch, frozen)
  step_fn.jitted = jitted  # aot.py lowers and compiles this same function ahead of time.
  return step_fn


def make_eval_step(loss_fn: LossFn, params_sh, batch_sh, metrics_sh, frozen_sh=()):
  """Returns eval(params, batch, index, frozen=()) -> metrics. The key is folded from the batch
  index only, so every evaluation pass sees the same noise."""
  base_key = jax.random.key(12345)

  def evaluate(params, batch, index, frozen):
    loss, aux = loss_fn(params, batch, jax.random.fold_in(base_key, index), frozen)
    return {"loss": loss, **aux}

  jitted = jax.jit(evaluate, in_shardings=(params_sh, batch_sh, metrics_sh, frozen_sh),
                   out_shardings=metrics_sh)
  return lambda params, batch, index, frozen=(): jitted(params, batch, index, frozen)


@dataclasses.dataclass
class StepParts:
  """Everything a stage's training step is assembled from (`assemble`)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  ema: bool
  state_sh: Any
  batch_sh: Any
  metrics_sh: Any
  frozen_sh: Any
  step_fn: Callable


def assemble(optim_cfg, num_steps: int, abstract, mesh, fsdp: bool, loss_fn: LossFn, frozen,
             seed: int) -> StepParts:
  """The one train-step assembly (trainer, aot dry runs, the training-cost benchmark): the
  optimizer of optim_cfg (AdamW or Muon) and its lr schedule for `num_steps`, the state /
  batch / frozen shardings, the jitted step."""
  from kforcing_jax.parallel import sharding
  from kforcing_jax.training import optimizer, state as train_state

  tx = optimizer.make_optimizer(optim_cfg, num_steps)
  schedule = optimizer.lr_schedule(optim_cfg, num_steps)
  ema = optim_cfg.ema_decay > 0
  state_sh = train_state.state_shardings(abstract, tx, mesh, fsdp, ema)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = make_train_step(loss_fn, tx, schedule, optim_cfg.ema_decay, seed, state_sh,
                            batch_sh, rep, frozen_sh)
  return StepParts(tx, schedule, ema, state_sh, batch_sh, rep, frozen_sh, step_fn)
