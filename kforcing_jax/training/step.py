"""Jitted train / eval steps with explicit in/out shardings and donation of the train state.

`loss_fn(params, batch, key, frozen) -> (loss, aux_metrics)` is the only stage-specific piece;
the AR teacher and every distillation stage share this step. `frozen` holds tensors that are read
but never trained (the distillation teacher): an explicit jit argument, not a baked-in constant,
with its own shardings, no gradient and no optimizer state.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# loss_fn(params, batch, key, frozen) -> (loss, aux metrics)
LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict]]


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
      new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
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
