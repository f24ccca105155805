"""stage_io: params-only restores of train-state and params-only checkpoints, on any mesh."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from kforcing_jax.training import checkpoint, state as train_state
from kforcing_jax.parallel import sharding
from kforcing_jax.training import stage_io
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib

CFG = model_lib.ModelConfig(vocab_size=97, mask_id=96, d_model=32, n_layers=2, n_heads=4)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _save_train_state(workdir, stage, seed):
  """A full train state with EMA, sharded on a (4, 2) mesh, as the trainer writes it."""
  mesh = sharding.make_mesh(4, 2)
  cls = model_lib.Transformer if stage == "teacher" else pflm_lib.PFLM
  factory = lambda rngs: cls(CFG, rngs)
  abstract = stage_io.abstract_module(CFG, 0 if stage == "teacher" else int(stage[1:]))
  tx = optax.adamw(1e-3)
  sh = train_state.state_shardings(abstract, tx, mesh, fsdp=True, ema=True)
  state = train_state.init_state(factory, tx, sh, seed, ema=True)
  # Make EMA differ from params so the test can tell which one came back.
  state["ema"] = jax.tree.map(lambda x: x + 1.0, state["ema"])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", stage))
  ckpt.save(7, state, {"model_config": CFG.__dict__, "stage": stage})
  ckpt.close()
  return _host(state)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "k2"])
def test_load_stage_restores_params_or_ema_on_other_meshes(tmp_path, stage):
  saved = _save_train_state(str(tmp_path), stage, seed=3)
  one = sharding.make_mesh(1, 1, jax.devices()[:1])
  for mesh, use_ema in ((None, True), (one, False), (sharding.make_mesh(2, 4), True)):
    got = stage_io.load_stage(str(tmp_path), stage, mesh=mesh, use_ema=use_ema,
                              load_tokenizer=False)
    want = saved["ema"] if use_ema else saved["params"]
    jax.tree.map(np.testing.assert_array_equal, _host(got.params), want)
    assert got.step == 7 and got.k == (0 if stage == "teacher" else 2)
    assert got.model_cfg == CFG
    leaf = jax.tree.leaves(got.params)[0]
    assert leaf.sharding.mesh.shape == got.mesh.shape
    # The restored params run: a forward pass through the merged module.
    logits = got.model()(np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, CFG.vocab_size)
  assert stage_io.list_stages(str(tmp_path)) == [stage]


def test_save_params_stage_round_trip_and_errors(tmp_path):
  with nnx.use_eager_sharding(False):
    _, params = model_lib.split_params(pflm_lib.PFLM(CFG, nnx.Rngs(1)))
  stage_io.save_params_stage(str(tmp_path), "k4", params, CFG, step=0, extra_meta={"src": "x"})
  stage_io.save_params_stage(str(tmp_path), "teacher",
                             {k: v for k, v in params.items() if k != "noise_encoder"}, CFG)
  assert stage_io.list_stages(str(tmp_path)) == ["teacher", "k4"]
  got = stage_io.load_stage(str(tmp_path), "k4", load_tokenizer=False)
  jax.tree.map(np.testing.assert_array_equal, _host(got.params), _host(params))
  assert got.meta["src"] == "x" and got.k == 4
  with pytest.raises(FileNotFoundError, match="stage 'k8' has no checkpoint.*teacher"):
    stage_io.load_stage(str(tmp_path), "k8")
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    stage_io.load_stage(str(tmp_path), "k4")
  with pytest.raises(ValueError, match="stages"):
    stage_io.save_params_stage(str(tmp_path), "bogus", params, CFG)
