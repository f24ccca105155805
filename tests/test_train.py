"""End to end through `trainer.run`: the real data pipeline, checkpoints, resume, NaN stop."""

import math
import os

import jax
import numpy as np
import pytest

from kforcing_jax.training import checkpoint, trainer
from kforcing_jax.config import base as config_base
from kforcing_jax.data import pipeline
from kforcing_jax.observe import metrics_log
from kforcing_jax.parallel import sharding

# Slow tier (-m 'not slow' skips it): end-to-end trainer.run chains, resume.
pytestmark = pytest.mark.slow


def tiny_config(data_dir: str, stages="teacher", steps=8):
  c = config_base.base_config()
  c.stages = stages
  c.model.d_model, c.model.n_layers, c.model.n_heads = 64, 2, 2
  c.data.bpe_vocab_size = 512
  c.data.tfds_data_dir = data_dir  # one prepared KJV copy for every test
  c.seq_len, c.batch_size = 32, 8
  c.mesh.data, c.mesh.model = 4, 2
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 2, "cosine"
  c.optim.ema_decay = 0.9
  c.train.num_steps = steps
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 4, 4
  c.train.eval_batches = 1
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_data"))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _train_losses(workdir, stage):
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if r["stage"] == stage and "loss" in r}


class Interrupt(Exception):
  pass


def _interrupt_after(monkeypatch, n_batches):
  """Simulate a kill: the (n_batches + 1)-th batch fetch raises."""
  real = sharding.global_batch
  calls = {"n": 0}

  def flaky(local, mesh):
    calls["n"] += 1
    if calls["n"] > n_batches:
      raise Interrupt()
    return real(local, mesh)

  monkeypatch.setattr(sharding, "global_batch", flaky)


def test_teacher_then_k2_end_to_end_and_resume_bit_exact(tmp_path, data_dir, monkeypatch):
  """An interrupted run resumed from its checkpoints equals an uninterrupted one bit for bit
  (params, EMA, optimizer state and every later loss), through a teacher and a k2 stage; run
  once more when finished, it is a no-op."""
  cfg = tiny_config(data_dir, stages="teacher,k2", steps=8)
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = trainer.run(cfg, ref_dir)
  for name in ("metrics.jsonl", "loss_curve.png", "tokenizer.json",
               "checkpoints/teacher/model_config.json", "checkpoints/k2/model_config.json"):
    assert os.path.exists(os.path.join(ref_dir, name)), name
  teacher_losses = _train_losses(ref_dir, "teacher")
  assert teacher_losses[8] < teacher_losses[1]
  assert set(ref["k2"]["val"]) >= {"val_nll_1", "val_nll_2", "val_acc_1", "val_acc_2",
                                   "val_acc_all", "val_teacher_data_nll"}

  # Killed during the teacher (after its step-4 checkpoint), then during k2, then finished.
  # The eval batches are fetched once per stage (1 batch), so the counts include them.
  _interrupt_after(monkeypatch, 1 + 6)
  with pytest.raises(Interrupt):
    trainer.run(cfg, cut_dir)
  assert checkpoint.Checkpointer(os.path.join(cut_dir, "checkpoints", "teacher")).latest_step() == 4
  monkeypatch.undo()
  _interrupt_after(monkeypatch, (1 + 4) + (1 + 6))
  with pytest.raises(Interrupt):
    trainer.run(cfg, cut_dir)
  assert checkpoint.Checkpointer(os.path.join(cut_dir, "checkpoints", "k2")).latest_step() == 4
  monkeypatch.undo()
  resumed = trainer.run(cfg, cut_dir)

  for stage in ("teacher", "k2"):
    a, b = _host(ref[stage]["state"]), _host(resumed[stage]["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
    ref_losses, cut_losses = _train_losses(ref_dir, stage), _train_losses(cut_dir, stage)
    assert ref_losses == {s: cut_losses[s] for s in ref_losses}  # resume also logs its 1st step
  assert ref["k2"]["val"] == resumed["k2"]["val"]

  # A finished run started again resumes every stage at its last step: nothing changes.
  n_lines = len(metrics_log.read_jsonl(os.path.join(cut_dir, "metrics.jsonl")))
  again = trainer.run(cfg, cut_dir)
  for stage in ("teacher", "k2"):
    for x, y in zip(jax.tree.leaves(_host(resumed[stage]["state"])),
                    jax.tree.leaves(_host(again[stage]["state"]))):
      np.testing.assert_array_equal(x, y)
  assert len(metrics_log.read_jsonl(os.path.join(cut_dir, "metrics.jsonl"))) == n_lines


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  cfg = tiny_config(data_dir, steps=6)
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e30, 0, "constant"
  cfg.train.ckpt_every = 1
  workdir = str(tmp_path / "w")
  with pytest.raises(FloatingPointError, match=r"\[teacher\] non-finite .* at step \d"):
    trainer.run(cfg, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "teacher"))
  step = ckpt.latest_step()
  assert step is not None and step >= 1
  meta = ckpt.read_meta(step)
  assert meta["stage"] == "teacher"
  # Every saved step had a finite loss in metrics.jsonl.
  losses = _train_losses(workdir, "teacher")
  assert all(math.isfinite(v) for s, v in losses.items() if s <= step)


def test_per_stage_settings_and_validation_against_the_ar_teacher(tmp_path, data_dir):
  """Each stage trains with its own steps, schedule, batch and optimizer (k2 even drops the
  clipping that k1 used, so its optimizer state has another structure: loading k1 must not
  depend on it); every PFLM stage keeps the teacher's architecture (checked against the
  checkpoints') and also reports NLL_j / acc_j against the AR teacher's targets. k2_2 (phase 2 of k2) starts from k2's weights and is distilled
  from k2's teacher k1, with its own seed: at an lr too small to move it, its validation
  equals k2's exactly (same weights, same teacher, same validation noise); rolling out k2
  itself would not."""
  import ml_collections
  cfg = tiny_config(data_dir, stages="teacher,k1,k2,k2_2", steps=4)
  cfg.stage_overrides = ml_collections.ConfigDict({
      "k1": {"train": {"num_steps": 6}, "optim": {"lr": 1e-2, "warmup_steps": 3,
                                                   "schedule": "constant"}, "batch_size": 16},
      "k2": {"train": {"num_steps": 2}, "optim": {"warmup_steps": 0, "grad_clip": 0.0,
                                                   "ema_decay": 0.0}},
      "k2_2": {"train": {"num_steps": 2}, "optim": {"lr": 1e-30, "warmup_steps": 0,
                                                     "ema_decay": 0.0}}})
  workdir = str(tmp_path / "w")
  out = trainer.run(cfg, workdir)
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  lr = {(r["stage"], r["step"]): r["lr"] for r in rows if "lr" in r}
  assert lr[("k1", 1)] == pytest.approx(0.0) and lr[("k1", 4)] == pytest.approx(1e-2)
  assert lr[("k1", 6)] == pytest.approx(1e-2)  # constant after its own 3 warm-up steps
  assert lr[("k2", 1)] == pytest.approx(cfg.optim.lr)  # no warm-up, cosine from the base lr
  assert max(s for st, s in lr if st == "k1") == 6 and max(s for st, s in lr if st == "k2") == 2
  meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "k1")).read_meta()
  assert meta["config"]["batch_size"] == 16
  layers = {st: checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", st)).read_meta()[
      "model_config"]["n_layers"] for st in ("teacher", "k1", "k2")}
  assert layers == {"teacher": 2, "k1": 2, "k2": 2}
  k1, k2 = out["k1"]["val"], out["k2"]["val"]
  # Right after the teacher the stage's own targets ARE the AR teacher's targets; val_ar_*
  # scores the weights k1 hands on: its EMA (k1 keeps one, k2 does not).
  assert k1["val_ar_nll_1"] == pytest.approx(k1["val_ema_nll_1"], rel=1e-6)
  assert k1["val_ar_nll_1"] != pytest.approx(k1["val_nll_1"], rel=1e-6)
  # After a PFLM(1) the targets differ: the drift against the AR teacher shows.
  assert {"val_ar_nll_1", "val_ar_nll_2", "val_ar_acc_1", "val_ar_acc_2"} <= set(k2)
  assert k2["val_ar_nll_2"] != pytest.approx(k2["val_nll_2"], rel=1e-3)
  assert "ema" not in out["k2"]["state"] and "ema" in out["k1"]["state"]
  k2_2 = out["k2_2"]["val"]
  for j in (1, 2):
    assert k2_2[f"val_nll_{j}"] == pytest.approx(k2[f"val_nll_{j}"], rel=1e-6)
    assert k2_2[f"val_ar_nll_{j}"] == pytest.approx(k2[f"val_ar_nll_{j}"], rel=1e-6)
  meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "k2_2")).read_meta()
  assert meta["stage"] == "k2_2" and meta["config"]["seed"] == cfg.seed + 1
  assert meta["model_config"]["n_layers"] == 2
  assert _train_losses(workdir, "k2_2")[2] != pytest.approx(_train_losses(workdir, "k2")[2],
                                                            rel=1e-6)  # other data and noise


def test_unigram_head_bias_starts_the_teacher_at_the_unigram_distribution(tmp_path, data_dir):
  """train.head_bias_init: step 1's loss (lr 0 in warm-up) is log V for the zero bias and the
  smoothed unigram's cross-entropy on that batch for "unigram", recomputed here from the data."""
  first = {}
  for init in ("zeros", "unigram"):
    cfg = tiny_config(data_dir, steps=3)
    cfg.train.log_every, cfg.train.head_bias_init = 1, init
    workdir = str(tmp_path / init)
    trainer.run(cfg, workdir)
    first[init] = _train_losses(workdir, "teacher")[1]
  s = trainer.setup(cfg, workdir)
  v = s.model_cfg.vocab_size
  # Uniform over every id but the mask id, whose logit the model pins at -1000.
  assert first["zeros"] == pytest.approx(math.log(v - 1), abs=1e-4)
  counts = pipeline.unigram_counts(cfg.data, s.tokenizer, vocab_size=v, workdir=workdir)
  log_p = np.log((counts + 1.0) / (counts.sum() + v))
  batch = next(pipeline.make_train_iterator(cfg.data, s.tokenizer, seq_len=cfg.seq_len,
                                            global_batch_size=cfg.batch_size, seed=cfg.seed,
                                            workdir=workdir))
  assert first["unigram"] == pytest.approx(-log_p[batch[:, 1:]].mean(), abs=1e-3)
  assert first["unigram"] < first["zeros"] - 0.5
