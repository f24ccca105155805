"""Sharded == single-device training; checkpoints restore onto other meshes; crash safety."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.training import checkpoint, optimizer
from kforcing_jax.config import base as config_base
from kforcing_jax.distill import losses
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.training import state as train_state, step as train_step

CFG = model_lib.ModelConfig(vocab_size=128, mask_id=127, d_model=64, n_layers=2, n_heads=4)


def _optim(name="adamw"):
  o = config_base.base_config().optim
  o.lr, o.warmup_steps, o.ema_decay, o.name = 3e-3, 2, 0.9, name
  return o


class Trainer:
  """The AR train step on a given mesh, without the data pipeline."""

  def __init__(self, mesh, fsdp=False, optim_name="adamw"):
    self.mesh = mesh
    o = _optim(optim_name)
    self.tx = optimizer.make_optimizer(o, 100)
    self.factory = lambda rngs: model_lib.Transformer(CFG, rngs)
    abstract = model_lib.abstract_model(CFG)
    graphdef, _ = model_lib.split_params(abstract)
    self.state_sh = train_state.state_shardings(abstract, self.tx, mesh, fsdp, ema=True)
    loss_fn = lambda p, t, k, frozen: losses.next_token_loss(model_lib.merge(graphdef, p), t)
    self.step = train_step.make_train_step(
        loss_fn, self.tx, optimizer.lr_schedule(o, 100), o.ema_decay, 0, self.state_sh,
        sharding.batch_sharding(mesh), sharding.replicated(mesh))

  def init(self):
    return train_state.init_state(self.factory, self.tx, self.state_sh, seed=0, ema=True)

  def abstract(self):
    return train_state.abstract_state(train_state.state_shapes(self.factory, self.tx, True),
                                      self.state_sh)

  def run(self, state, batches):
    out = []
    for b in batches:
      state, m = self.step(state, sharding.global_batch(b, self.mesh))
      out.append(float(m["loss"]))
    return state, out


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, CFG.mask_id, (8, 16), dtype=np.int32) for _ in range(n)]


def _mesh(data, model):
  return sharding.make_mesh(data, model, jax.devices()[: data * model])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_eight_devices_available():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.mark.slow
@pytest.mark.parametrize("shape,fsdp", [((4, 2), False), ((2, 4), True), ((8, 1), True)])
def test_sharded_equals_single_device(shape, fsdp):
  batches = _batches(5)
  single = Trainer(_mesh(1, 1))
  s1, l1 = single.run(single.init(), batches)
  multi = Trainer(_mesh(*shape), fsdp=fsdp)
  state = multi.init()
  qkv = state["params"]["blocks"][0]["attn_qkv"]
  assert qkv.sharding.spec[2] == "model"  # heads really are split over the model axis
  if fsdp:
    assert qkv.sharding.spec[0] == "data"
  s8, l8 = multi.run(state, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  assert l1[-1] < l1[0]
  for a, b in zip(jax.tree.leaves(_host(s1["params"])), jax.tree.leaves(_host(s8["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_muon_sharded_equals_single_device_and_its_moments_follow_their_params():
  """optim.name=muon: the blocks' matrices take orthogonalised updates (their AdamW moments are
  masked out), the embedding and head take AdamW's, and every moment is sharded like its
  parameter, so sharded training still equals one device."""
  batches = _batches(5)
  single = Trainer(_mesh(1, 1), optim_name="muon")
  s1, l1 = single.run(single.init(), batches)
  multi = Trainer(_mesh(2, 4), fsdp=True, optim_name="muon")
  state = multi.init()
  qkv_sh = state["params"]["blocks"][0]["attn_qkv"].sharding
  moments = [(jax.tree_util.keystr(p), x) for p, x in
             jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
  qkv_moments = [x for p, x in moments if p.endswith("['blocks'][0]['attn_qkv']")]
  head_moments = [x for p, x in moments if p.endswith("['head']")]
  assert len(qkv_moments) == 1 and len(head_moments) == 2  # Muon's momentum; AdamW's mu, nu
  assert qkv_moments[0].sharding.spec == qkv_sh.spec and qkv_sh.spec[0] == "data"
  s8, l8 = multi.run(state, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-4, atol=1e-4)
  adamw = Trainer(_mesh(1, 1))
  sa, _ = adamw.run(adamw.init(), batches)
  qkv = lambda s: _host(s["params"])["blocks"][0]["attn_qkv"]
  assert np.abs(qkv(sa) - qkv(s1)).max() > 1e-3  # the blocks' updates really changed
  for a, b in zip(jax.tree.leaves(_host(s1["params"])), jax.tree.leaves(_host(s8["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("optim_name", ["adamw", "muon"])
def test_checkpoint_restores_on_other_meshes(tmp_path, optim_name):
  batches = _batches(6, seed=1)
  src = Trainer(_mesh(4, 2), optim_name=optim_name)
  state, _ = src.run(src.init(), batches[:3])
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ckpt.save(3, state, {"model_config": {"d_model": CFG.d_model}})
  assert os.path.exists(tmp_path / "ck" / checkpoint.MODEL_CONFIG_FILE)
  saved = _host(state)
  _, ref_losses = src.run(state, batches[3:])

  for shape in ((2, 4), (1, 1)):
    dst = Trainer(_mesh(*shape), optim_name=optim_name)
    restored, meta = ckpt.restore(ckpt.latest_step(), dst.abstract())
    assert meta["model_config"]["d_model"] == CFG.d_model
    leaf = restored["params"]["blocks"][0]["attn_qkv"]
    assert leaf.sharding.mesh.shape == dict(zip(("data", "model"), shape))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(_host(restored))):
      np.testing.assert_array_equal(a, b)  # bit-exact
    _, losses_after = dst.run(restored, batches[3:])
    np.testing.assert_allclose(losses_after, ref_losses, rtol=1e-5, atol=1e-5)
  ckpt.close()


def test_incomplete_save_never_shadows_latest_good(tmp_path):
  """A save that died half-way (Orbax's temporary dir, never renamed) is ignored."""
  t = Trainer(_mesh(1, 1))
  state = t.init()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ckpt.save(1, state, {"model_config": {}})
  good = _host(state)
  ckpt.close()
  # What a SIGKILL during the save of step 2 leaves behind: a partially written tmp dir.
  partial = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  assert ckpt.latest_step() == 1
  restored, _ = ckpt.restore(1, t.abstract())
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(_host(restored))):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


@pytest.mark.slow
def test_ema_follows_its_warmup_formula_step_by_step():
  """EMA after step t+1 = d_t * EMA + (1 - d_t) * params, d_t = min(decay, (1+t)/(10+t)),
  recomputed on the host from the raw params the step returned."""
  trainer = Trainer(_mesh(1, 1))
  state = trainer.init()
  ema_ref = _host(state["ema"])
  for t, b in enumerate(_batches(4)):
    state, _ = trainer.step(state, sharding.global_batch(b, trainer.mesh))
    d = min(0.9, (1 + t) / (10 + t))
    ema_ref = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_ref, _host(state["params"]))
    for got, want in zip(jax.tree.leaves(_host(state["ema"])), jax.tree.leaves(ema_ref)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The first steps' decay is far below the configured one: the start weights fade quickly.
  assert float(train_step.ema_decay_at(0.999, 0)) == pytest.approx(0.1)
  assert float(train_step.ema_decay_at(0.999, 100_000)) == pytest.approx(0.999)
