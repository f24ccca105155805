"""launch/: every script passes `bash -n` and shellcheck; the commands they build are right.

The TPU script runs with KF_DRY_RUN=1 (prints its gcloud commands); the SLURM script runs with
stand-in `scontrol` / `srun` binaries and KF_PYTHON=echo, so the training command line it would
start on each node is checked without a cluster.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "**", "*.sh"), recursive=True) +
                 glob.glob(os.path.join(REPO, "launch", "**", "*.sbatch"), recursive=True))
TPU = os.path.join(REPO, "launch", "tpu.sh")


def test_scripts_exist():
  names = {os.path.relpath(p, REPO) for p in SCRIPTS}
  assert {"launch/tpu.sh", "launch/slurm/train.sbatch", "launch/slurm/task.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, REPO))
def test_bash_syntax_and_shellcheck(script):
  subprocess.run(["bash", "-n", script], check=True)
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -r requirements-test.txt"
  out = subprocess.run([shellcheck, "--severity=style", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
  assert os.access(script, os.X_OK), f"{script} is not executable"


def tpu(*args, **env):
  base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
          "TPU_NAME": "kf-test", "TPU_ZONE": "us-central2-b", "KF_DRY_RUN": "1"}
  base.update(env)
  base = {k: v for k, v in base.items() if v is not None}
  return subprocess.run([TPU, *args], capture_output=True, text=True, env=base, timeout=60)


def test_tpu_run_starts_the_same_command_on_every_worker():
  out = tpu("run", "configs/lm1b.py", "/mnt/kf/runs/lm1b", "--config.train.num_steps=10",
            TPU_NUM_WORKERS="8", TPU_PROJECT="my-proj")
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip()
  assert line.startswith("gcloud compute tpus tpu-vm ssh kf-test --zone us-central2-b "
                         "--project my-proj --worker=all --command ")
  command = line.replace("\\", "")
  for part in ("python -u -m kforcing_jax.train --config configs/lm1b.py --workdir "
               "/mnt/kf/runs/lm1b --distributed=on --expected_processes=8 "
               "--config.train.num_steps=10", "nohup", "> $HOME/kforcing_train.log",
               "> $HOME/kforcing_train.pid"):
    assert part in command, (part, command)


def test_tpu_create_setup_copy_stop_delete_commands():
  create = tpu("create", TPU_TYPE="v5litepod-32", TPU_RUNTIME="v2-alpha-tpuv5-lite", TPU_SPOT="1")
  assert create.returncode == 0, create.stderr
  assert create.stdout.split() == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "kf-test", "--zone", "us-central2-b",
      "--accelerator-type", "v5litepod-32", "--version", "v2-alpha-tpuv5-lite", "--spot"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    jax_pin = re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)
  setup = tpu("setup").stdout.replace("\\", "")
  assert "--worker=all" in setup and f"jax[tpu]=={jax_pin}" in setup
  assert "uv pip install -r $HOME/kforcing_jax/requirements.txt" in setup
  copy = tpu("copy")
  assert copy.returncode == 0, copy.stderr
  scp, untar = (line.strip() for line in copy.stdout.strip().splitlines())
  assert scp.startswith("gcloud compute tpus tpu-vm scp ") and scp.endswith("--worker=all")
  archive = scp.split()[5]
  listing = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True).stdout
  shutil.rmtree(os.path.dirname(archive))
  assert "kforcing_jax/train.py" in listing and "configs/lm1b.py" in listing
  assert "tar -xzf" in untar.replace("\\", "")
  assert "kill $(cat $HOME/kforcing_train.pid)" in tpu("stop").stdout.replace("\\", "")
  assert tpu("delete").stdout.split()[-1] == "--quiet"


def test_tpu_missing_settings_fail_with_the_variable_name():
  out = tpu("status", TPU_NAME=None)
  assert out.returncode == 2 and "set TPU_NAME" in out.stderr
  out = tpu("create", TPU_RUNTIME="x")
  assert out.returncode == 2 and "set TPU_TYPE" in out.stderr
  out = tpu("run", "configs/lm1b.py")
  assert out.returncode == 2 and "usage: launch/tpu.sh run CONFIG WORKDIR" in out.stderr
  out = tpu("bogus")
  assert out.returncode == 2 and "unknown command bogus" in out.stderr


def test_slurm_script_sets_the_coordinator_from_the_allocation(tmp_path):
  """Stand-in scontrol/srun: the node list 'gpu-[07-08]' expands to gpu-07, gpu-08; srun runs
  the task as process 1 of 2, whose python is `echo`, printing the command it would run."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-07\\ngpu-08\\n'\n")
  (bin_dir / "srun").write_text("#!/usr/bin/env bash\n"
                                "[[ $1 == --kill-on-bad-exit=1 ]] || exit 9\nshift\n"
                                "SLURM_PROCID=1 exec \"$@\"\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": REPO,
         "KF_CONFIG": "configs/owt.py", "KF_WORKDIR": "/shared/runs/owt",
         "KF_GPUS_PER_NODE": "4", "KF_PYTHON": "echo"}
  out = subprocess.run([os.path.join(REPO, "launch", "slurm", "train.sbatch"),
                        "--config.train.num_steps=5"], capture_output=True, text=True, env=env,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  header, command = out.stdout.strip().splitlines()
  port = 20000 + 4242 % 20000
  assert f"coordinator gpu-07:{port}" in header
  assert command.split() == [
      "-u", "-m", "kforcing_jax.train", "--config", "configs/owt.py", "--workdir",
      "/shared/runs/owt", "--coordinator_address", f"gpu-07:{port}", "--num_processes", "2",
      "--process_id", "1", "--expected_processes", "2", "--local_device_ids", "0,1,2,3",
      "--config.train.num_steps=5"]
  missing = subprocess.run([os.path.join(REPO, "launch", "slurm", "train.sbatch")],
                           capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "KF_WORKDIR"}, timeout=60)
  assert missing.returncode != 0 and "set KF_WORKDIR" in missing.stderr
