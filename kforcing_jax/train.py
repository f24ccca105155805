"""Entry point: python -m kforcing_jax.train --config configs/kjv_tiny.py --workdir DIR.

The same command runs on one machine or on every host of a TPU pod / GPU cluster: multi-process
start-up (kforcing_jax/parallel/distributed.py) is decided by the flags below or the environment
(SLURM, TPU pod, JAX_COORDINATOR_ADDRESS). `--dry_run` compiles every stage's train step ahead
of time for a mesh of fake CPU devices instead of training (kforcing_jax/training/aot.py).
Kept short on purpose: the logic lives in importable, testable modules.
"""

import os

from absl import flags

from kforcing_jax import cli
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto = when flags/SLURM/TPU-pod env say so; on = always call "
    "jax.distributed.initialize (jax auto-detects Cloud TPU pods); off = one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 (with --num_processes/--process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", -1, "Processes in the job (-1: detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (-1: detect).")
_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids", "", "Comma-separated local device ids this process drives ('' = all; "
    "needed on SLURM with one task per node, where jax would otherwise pick one GPU).")
_EXPECTED = flags.DEFINE_integer(
    "expected_processes", -1, "Fail fast unless jax sees exactly this many processes.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout_s", 300, "Give up (exit status 75) if the processes have not all joined.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile every stage's train step ahead of time on fake CPU devices, print "
    "parameter counts and per-device memory, and exit. Touches no data and no tokenizer.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 32,
                                        "Fake CPU devices (the mesh size) for --dry_run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _DRY_RUN.value:
    # Must precede the first jax import: the fake devices are fixed when the backend starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={_DRY_RUN_DEVICES.value}").strip()
    from kforcing_jax.training import aot
    from kforcing_jax.observe import metrics_log

    metrics_log.configure_logging()
    aot.dry_run(_CONFIG.value, _WORKDIR.value, _DRY_RUN_DEVICES.value)
    return

  from kforcing_jax.parallel import distributed

  distributed.start(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                    _PROCESS_ID.value, _LOCAL_DEVICES.value, _EXPECTED.value,
                    _INIT_TIMEOUT.value)
  from kforcing_jax.training import trainer  # Imported after start-up: nothing touches jax before it.

  trainer.configure_logging()
  trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
