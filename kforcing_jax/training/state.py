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
  """NamedShardings for every leaf: optimizer moments follow their parameter.

  A moment is matched to its parameter by path suffix and shape (an optimizer nests the params'
  tree under its state fields, e.g. mu['blocks'][0]['mlp_in']); anything else, such as step
  counts, is replicated. Unlike optax.tree_map_params this also covers partitioned optimizers
  (Muon's AdamW part), whose states hold masked params trees."""
  p_sh = sharding.param_shardings(abstract_module, mesh, fsdp)
  _, abs_params = model_lib.split_params(abstract_module)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  rep = sharding.replicated(mesh)
  by_path = {jax.tree_util.keystr(p): (x.shape, sh) for (p, x), sh in
             zip(jax.tree_util.tree_flatten_with_path(abs_params)[0], jax.tree.leaves(p_sh))}

  def follow(path, leaf):
    for i in range(len(path)):
      shape, sh = by_path.get(jax.tree_util.keystr(path[i:]), (None, None))
      if shape == leaf.shape:
        return sh
    return rep

  opt_sh = jax.tree_util.tree_map_with_path(follow, abs_opt)
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
