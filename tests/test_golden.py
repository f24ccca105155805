"""Golden values: a few steps of every stage kind on a shrunk copy of the default config.

`test_train.py` checks that losses fall and that a resumed run equals an uninterrupted one; this
file pins WHAT a fixed-seed run computes, so a refactor that changes numbers (data order, init,
rng folding, loss, optimizer, sharding) fails here even when training still "works".

The config is configs/kjv_tiny.py (unigram head bias, frequency-ordered BPE ids, noise features
up to 1000 cycles, soft targets, Muon, temperatures 0.5-1.2 plus greedy windows), made tiny: stages teacher -> k1 (a PFLM distilled from
the AR teacher's inverse-CDF rollout) -> k2 (self-forcing from the PFLM k1, with the default k4
stage's Muon optimizer), 3 steps each through `trainer.run` (data pipeline, evaluation,
checkpoints, the hand-over between stages), on the default mesh over the 8 fake CPU devices.
The draft stage runs the teacher's code with other sizes and is left out to keep this fast.
"""

import os

import jax
import numpy as np
import pytest

from kforcing_jax.config import base as config_base
from kforcing_jax.observe import metrics_log
from kforcing_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UPDATE_MESSAGE = (
    "\n\n  GOLDEN VALUES CHANGED. A fixed-seed run of every stage kind no longer computes what it "
    "did.\n  Update GOLDEN in tests/test_golden.py ONLY IF the change of behaviour is intended "
    "(and say so in the commit message);\n  a refactor must leave these numbers unchanged. "
    "Observed values:\n  {observed!r}\n")

# Bit-level agreement is expected on one machine; the tolerance only absorbs another CPU's
# reduction order (a behaviour change moves these by far more).
RTOL = 1e-5

# {stage: (training loss at each logged step, sum of |params| in float64)}.
GOLDEN = {
    "teacher": ([5.244746685028076, 5.266744613647461, 5.2515106201171875], 6254.4234840006575),
    "k1": ([4.572872161865234, 5.197585582733154, 4.696196556091309], 6982.613194214129),
    "k2": ([3.1579670906066895, 3.1642355918884277, 2.8149335384368896], 7166.706003768582),
}


def golden_config(data_dir: str):
  c = config_base.load_config_file(os.path.join(REPO, "configs", "kjv_tiny.py"))
  c.stages = "teacher,k1,k2"
  c.model.d_model, c.model.n_layers, c.model.n_heads = 64, 1, 2
  c.data.bpe_vocab_size = 512
  c.data.tfds_data_dir = data_dir
  c.seq_len, c.batch_size = 32, 8
  c.train.log_every, c.train.eval_batches = 1, 1
  for stage in ("teacher", "k1", "k2"):
    so = c.stage_overrides[stage]
    so.train.num_steps, so.optim.warmup_steps, so.batch_size = 3, 1, 8
    so.train.eval_every = so.train.ckpt_every = 3
    so.train.eval_batches = 1
  # The default's k4 settings (Muon at its lr) on the self-forcing stage.
  for field in ("name", "lr"):
    c.stage_overrides.k2.optim[field] = c.stage_overrides.k4.optim[field]
  return c


def _checksum(params) -> float:
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(jax.device_get(params))))


def observe(workdir: str, data_dir: str) -> dict:
  out = trainer.run(golden_config(data_dir), workdir)
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {stage: ([r["loss"] for r in rows if r["stage"] == stage and "loss" in r],
                  _checksum(out[stage]["state"]["params"]))
          for stage in out}


def test_a_few_steps_of_every_stage_kind_give_the_golden_values(tmp_path):
  observed = observe(str(tmp_path / "w"), str(tmp_path / "tfds_data"))
  message = UPDATE_MESSAGE.format(observed=observed)
  assert set(observed) == set(GOLDEN), message
  for stage, (losses, checksum) in GOLDEN.items():
    got_losses, got_checksum = observed[stage]
    assert len(got_losses) == len(losses), message
    np.testing.assert_allclose(got_losses, losses, rtol=RTOL, err_msg=message)
    assert got_checksum == pytest.approx(checksum, rel=RTOL), message
