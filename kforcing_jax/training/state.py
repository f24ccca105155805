"""Train state as a plain pytree: {'step', 'params', 'opt_state'[, 'ema']}, born sharded.

A plain dict (params as nested dicts of arrays) keeps checkpoints independent of Flax's object
model and makes restoring onto another mesh a matter of passing other shardings.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding

TrainState = dict[str, Any]


def state_shardings(abstract_module: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    fsdp: bool, ema: bool) -> TrainState:
  """NamedShardings for every leaf: optimizer moments follow their parameter."""
  p_sh = sharding.param_shardings(abstract_module, mesh, fsdp)
  _, abs_params = model_lib.split_params(abstract_module)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, p_sh,
                                 transform_non_params=lambda _: rep)
  out = {"step": rep, "params": p_sh, "opt_state": opt_sh}
  if ema:
    out["ema"] = p_sh
  return out


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the CURRENT mesh's shardings: the Orbax restore target."""
  return sharding.abstract_arrays(shapes, shardings)


def _fresh_state(module_factory, tx, key, ema: bool) -> TrainState:
  with nnx.use_eager_sharding(False):
    _, params = model_lib.split_params(module_factory(nnx.Rngs(key)))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if ema:
    state["ema"] = params
  return state


def init_state(module_factory, tx: optax.GradientTransformation, shardings: TrainState,
               seed: int, ema: bool) -> TrainState:
  """Initialise directly into the target shardings (no unsharded copy on one device)."""
  init = lambda key: _fresh_state(module_factory, tx, key, ema)
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def state_shapes(module_factory, tx: optax.GradientTransformation, ema: bool) -> TrainState:
  """Shapes and dtypes of the train state, computed without allocating it."""
  return jax.eval_shape(lambda: _fresh_state(module_factory, tx, jax.random.key(0), ema))
