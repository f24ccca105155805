"""Real multi-process JAX on localhost: 2 processes x 4 fake CPU devices, gloo collectives.

The 2-process run (the `python -m kforcing_jax.train` entry point, one global 8-device mesh)
must give the losses of the in-process 1-process 8-device run, for a teacher stage and a
distillation stage, and its checkpoints must restore in one process and train on identically.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from kforcing_jax.parallel import distributed
from kforcing_jax.observe import metrics_log
from kforcing_jax.training import trainer
from kforcing_jax.config.base import base_config

# Slow tier (-m 'not slow' skips it): processes joining one jax.distributed job.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400  # Whole 2-process run incl. start-up and compiles (~1-3 min on 2 shared cores).


def overrides(data_dir: str) -> dict:
  """The smallest run that still uses both mesh axes: d=64, 1 layer, (4, 2) mesh."""
  return {"stages": "teacher,k2", "model.d_model": 64, "model.n_layers": 1, "model.n_heads": 2,
          "data.source": "kjv", "data.bpe_vocab_size": 512, "data.tfds_data_dir": data_dir,
          "seq_len": 32, "batch_size": 8, "mesh.data": 4, "mesh.model": 2,
          "optim.lr": 3e-3, "optim.schedule": "constant", "optim.warmup_steps": 0,
          "optim.ema_decay": 0.9, "train.num_steps": 4, "train.log_every": 1,
          "train.eval_every": 4, "train.ckpt_every": 2, "train.eval_batches": 1,
          "train.keep_checkpoints": 3}


def make_config(data_dir: str):
  c = base_config()
  for key, value in overrides(data_dir).items():
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def write_config_file(path: str, data_dir: str) -> str:
  """The same config as `make_config`, as a config file for the entry point."""
  lines = ["from kforcing_jax.config.base import base_config", "", "", "def get_config():",
           "  c = base_config()"]
  lines += [f"  c.{key} = {value!r}" for key, value in overrides(data_dir).items()]
  with open(path, "w") as f:
    f.write("\n".join(lines + ["  return c", ""]))
  return path


def _losses(workdir: str) -> dict:
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {(r["stage"], r["step"], k): v for r in rows for k, v in r.items()
          if k == "loss" or k.startswith("val_")}


def _spawn_two(workdir: str, data_dir: str, log_dir: str) -> list[str]:
  """Run the entry point as processes 0 and 1; returns their outputs. Always cleans up."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  config_file = write_config_file(os.path.join(log_dir, "mp_config.py"), data_dir)
  procs, logs = [], []
  try:
    for pid in range(2):
      logs.append(open(os.path.join(log_dir, f"process_{pid}.log"), "w+"))
      cmd = [sys.executable, "-m", "kforcing_jax.train", f"--config={config_file}",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={pid}", "--expected_processes=2",
             "--init_timeout_s=120"]
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f"2-process run exceeded {TIMEOUT_S} s; logs in {log_dir}")
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{out[-4000:]}"
  return outputs


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
  data_dir = str(tmp_path / "tfds_data")
  cfg = make_config(data_dir)
  ref_dir, mp_dir, res_dir = (str(tmp_path / n) for n in ("ref", "mp", "resumed"))
  ref = trainer.run(cfg, ref_dir)  # 1 process, the 8 fake devices of conftest.

  # Share the tokenizer and token cache so the subprocesses skip BPE training (same bytes).
  os.makedirs(mp_dir)
  for name in ("tokenizer.json", "tokenizer_meta.json", "data_cache"):
    src = os.path.join(ref_dir, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(mp_dir, name))
  out0, out1 = _spawn_two(mp_dir, data_dir, str(tmp_path))

  # Start-up: each process logged its index and devices first; the world is one 8-device mesh.
  assert "process 0 of 2: 4 local cpu devices" in out0.lower(), out0[-3000:]
  assert "process 1 of 2: 4 local cpu devices" in out1.lower(), out1[-3000:]
  assert "8 in total" in out0 and "mesh data=4 model=2" in out0
  # Only process 0 logs progress and writes metrics / plots.
  assert "[teacher] step 4/4" in out0 and "[k2] step 4/4" in out0
  assert "[teacher] step" not in out1 and "[k2] step" not in out1
  assert os.path.exists(os.path.join(mp_dir, "loss_curve.png"))
  rows = metrics_log.read_jsonl(os.path.join(mp_dir, "metrics.jsonl"))
  keys = [(r["stage"], r["step"], "loss" in r) for r in rows]
  assert len(keys) == len(set(keys)), "metrics.jsonl has duplicate lines (several writers?)"

  # Same losses as one process: each process fed its own half of every global batch.
  want, got = _losses(ref_dir), _losses(mp_dir)
  assert set(want) == set(got)
  assert {s for s, _, _ in want} == {"teacher", "k2"}
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=str(key))

  # The 2-process checkpoints restore in ONE process: drop the final k2 checkpoint so the run
  # resumes k2 at step 2 (teacher weights from the 2-process teacher checkpoint) and finishes.
  shutil.copytree(mp_dir, res_dir)
  shutil.rmtree(os.path.join(res_dir, "checkpoints", "k2", "4"))
  iter_dir = os.path.join(res_dir, "checkpoints", "k2", "2", "data_iter")
  assert sorted(f for f in os.listdir(iter_dir) if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]  # grain alone would look for 0-of-1.
  resumed = trainer.run(cfg, res_dir)
  got = _losses(res_dir)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=str(key))
  for x, y in zip(jax.tree.leaves(_host(ref["k2"]["state"])),
                  jax.tree.leaves(_host(resumed["k2"]["state"]))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_missing_peer_times_out_with_a_clear_message(tmp_path):
  """Process 0 of 2 alone: exits with EXIT_INIT_TIMEOUT and says what it waited for."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-c",
         "from kforcing_jax.parallel import distributed; distributed.start("
         f"coordinator_address='127.0.0.1:{port}', num_processes=2, process_id=0, timeout_s=3)"]
  t0 = time.monotonic()
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, start_new_session=True)
  try:
    out, err = p.communicate(timeout=90)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  assert p.returncode == distributed.EXIT_INIT_TIMEOUT, (p.returncode, out, err[-2000:])
  assert "process 0 of 2 joining via flags: coordinator 127.0.0.1" in out
  assert "did not finish within 3 s" in err and f"127.0.0.1:{port}" in err
  assert time.monotonic() - t0 < 60


# ---- launch detection: pure functions of (flags, environment) ----

def test_detect_single_process_by_default():
  launch = distributed.detect(environ={})
  assert launch.source == "single" and not launch.multi_process


def test_detect_explicit_flags_and_their_errors():
  launch = distributed.detect(coordinator_address="10.0.0.1:1234", num_processes=4,
                              process_id=3, local_device_ids="0,1", environ={})
  assert (launch.source, launch.num_processes, launch.process_id, launch.local_device_ids,
          launch.expected_processes) == ("flags", 4, 3, (0, 1), 4)
  with pytest.raises(distributed.LaunchError, match="--process_id missing"):
    distributed.detect(coordinator_address="h:1", num_processes=2, environ={})
  with pytest.raises(distributed.LaunchError, match=r"process id 2 is not in \[0, 2\)"):
    distributed.detect(coordinator_address="h:1", num_processes=2, process_id=2, environ={})
  with pytest.raises(distributed.LaunchError, match="must be host:port"):
    distributed.detect(coordinator_address="h", num_processes=2, process_id=0, environ={})
  with pytest.raises(distributed.LaunchError, match="--expected_processes=8 but --num_processes"):
    distributed.detect(coordinator_address="h:1", num_processes=2, process_id=0,
                       expected_processes=8, environ={})


def test_detect_environments():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.detect(environ=env).process_id == 1
  with pytest.raises(distributed.LaunchError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    distributed.detect(environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
  launch = distributed.detect(environ=slurm)
  assert launch.source == "slurm" and launch.expected_processes == 4
  assert distributed.detect(environ={**slurm, "SLURM_NTASKS": "1"}).source == "single"
  with pytest.raises(distributed.LaunchError, match="SLURM_NTASKS says 4"):
    distributed.detect(expected_processes=2, environ=slurm)
  tpu = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
  assert distributed.detect(environ=tpu).expected_processes == 4
  assert distributed.detect(mode="on", environ={}).source == "forced"
  assert distributed.detect(mode="off", environ=slurm).source == "single"
  with pytest.raises(distributed.LaunchError, match="nothing says this is a multi-process"):
    distributed.detect(expected_processes=4, environ={})


def test_world_check_fails_fast_on_a_wrong_process_count():
  launch = distributed.detect(coordinator_address="h:1", num_processes=4, process_id=0,
                              environ={})
  distributed.check_world(launch, process_count=4, process_index=0)
  with pytest.raises(distributed.LaunchError, match="jax sees 2 processes but .* expected 4"):
    distributed.check_world(launch, process_count=2, process_index=0)
  with pytest.raises(distributed.LaunchError, match="assigned process index 1"):
    distributed.check_world(launch, process_count=4, process_index=1)
