"""Jitted train / eval steps with explicit in/out shardings and donation of the train state.

`loss_fn(params, batch, key) -> (loss, aux_metrics)` is the only stage-specific piece; the AR
teacher and every distillation stage share this step.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float, seed: int, state_sh, batch_sh, metrics_sh):
  """Returns step(state, batch) -> (state, metrics); the input state is donated."""
  base_key = jax.random.key(seed)

  def step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])  # rngs come from the step, not Python.
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
      new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": jnp.asarray(schedule(state["step"]), jnp.float32), **aux}
    return new, metrics

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                 donate_argnums=0)


def make_eval_step(loss_fn: LossFn, params_sh, batch_sh, metrics_sh):
  """Returns eval(params, batch) -> (loss, aux) with a fixed key (evaluation is deterministic)."""
  key = jax.random.key(0)

  def evaluate(params, batch):
    loss, aux = loss_fn(params, batch, key)
    return {"loss": loss, **aux}

  return jax.jit(evaluate, in_shardings=(params_sh, batch_sh), out_shardings=metrics_sh)
