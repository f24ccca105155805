"""Multi-host start-up: decide whether this is one process of many, join them, check the world.

One training command runs unchanged on every host of a TPU pod or GPU cluster (GSPMD: each
process drives its local devices, the mesh spans all of them). Before any jax computation each
process calls `start()`, which:
  1. works out how it was launched (`detect`): explicit flags, JAX_* environment variables,
     SLURM, a TPU pod, or a plain single process;
  2. calls `jax.distributed.initialize` with a watchdog, so a missing peer or a wrong coordinator
     address ends the process with a message naming the likely cause instead of hanging;
  3. logs its process index, the process count and its devices (every process, first thing);
  4. fails fast when the process count differs from what the launch expected.
Pure functions of (flags, environment) make the detection testable without a cluster.
"""

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence

MODES = ("auto", "on", "off")
EXIT_INIT_TIMEOUT = 75  # Distinct exit status: jax.distributed.initialize did not complete.


class LaunchError(RuntimeError):
  """The launch is inconsistent (flags vs environment vs what jax found); the message says how."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started and what `jax.distributed.initialize` will be given."""
  source: str  # "single", "flags", "env", "slurm", "tpu" or "forced" (auto-detected by jax)
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  expected_processes: int | None = None  # The world size the launcher promised, if it said.

  @property
  def multi_process(self) -> bool:
    return self.source != "single"


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def parse_device_ids(text: str) -> tuple[int, ...] | None:
  """'0,1,2,3' -> (0, 1, 2, 3); '' -> None (jax's default: every local device)."""
  text = text.strip()
  if not text:
    return None
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError:
    raise LaunchError(f"--local_device_ids={text!r} must be comma-separated integers") from None


def detect(mode: str = "auto", coordinator_address: str = "", num_processes: int = -1,
           process_id: int = -1, local_device_ids: str = "", expected_processes: int = -1,
           environ: Mapping[str, str] | None = None) -> Launch:
  """Decide how this process was launched. Explicit flags win over the environment.

  mode "off" never initialises; "on" always does (jax auto-detects TPU/SLURM/MPI values the
  flags leave open); "auto" initialises when flags, JAX_COORDINATOR_ADDRESS, a SLURM job of
  more than one task, or a TPU pod (TPU_WORKER_HOSTNAMES with several hosts) say so.
  """
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise LaunchError(f"--distributed={mode!r} must be one of {MODES}")
  devices = parse_device_ids(local_device_ids)
  expected = expected_processes if expected_processes > 0 else None
  if mode == "off":
    if expected not in (None, 1):
      raise LaunchError(f"--distributed=off runs one process, but --expected_processes="
                        f"{expected_processes}")
    return Launch("single", expected_processes=expected)

  given = {"--coordinator_address": coordinator_address or None,
           "--num_processes": num_processes if num_processes > 0 else None,
           "--process_id": process_id if process_id >= 0 else None}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise LaunchError(f"multi-process flags are incomplete: {', '.join(missing)} missing "
                        f"(give --coordinator_address, --num_processes and --process_id "
                        f"together, or none of them)")
    return _explicit("flags", coordinator_address, num_processes, process_id, devices, expected)

  env_addr = environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if env_addr:
    n, pid = _int_env(environ, "JAX_NUM_PROCESSES"), _int_env(environ, "JAX_PROCESS_ID")
    if n is None or pid is None:
      raise LaunchError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                        "must be set too")
    return _explicit("env", env_addr, n, pid, devices, expected)

  slurm_tasks = _int_env(environ, "SLURM_NTASKS") if "SLURM_JOB_ID" in environ else None
  if slurm_tasks is not None and slurm_tasks > 1:
    _check_expected(expected, slurm_tasks, "SLURM_NTASKS")
    return Launch("slurm", local_device_ids=devices, expected_processes=slurm_tasks)

  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    _check_expected(expected, len(hosts), "TPU_WORKER_HOSTNAMES")
    return Launch("tpu", local_device_ids=devices, expected_processes=len(hosts))

  if mode == "on":
    return Launch("forced", local_device_ids=devices, expected_processes=expected)
  if expected not in (None, 1):
    raise LaunchError(
        f"--expected_processes={expected_processes} but nothing says this is a multi-process "
        f"launch (no --coordinator_address, JAX_COORDINATOR_ADDRESS, SLURM job of several tasks "
        f"or TPU pod environment); on a Cloud TPU pod add --distributed=on")
  return Launch("single", local_device_ids=devices, expected_processes=expected)


def _check_expected(expected: int | None, actual: int, what: str) -> None:
  if expected is not None and expected != actual:
    raise LaunchError(f"--expected_processes={expected} but {what} says {actual} processes")


def _explicit(source, address, n, pid, devices, expected) -> Launch:
  if n < 1:
    raise LaunchError(f"number of processes must be >= 1, got {n}")
  if not 0 <= pid < n:
    raise LaunchError(f"process id {pid} is not in [0, {n}) (num_processes={n})")
  if ":" not in address:
    raise LaunchError(f"coordinator address {address!r} must be host:port")
  _check_expected(expected, n, "--num_processes" if source == "flags" else "JAX_NUM_PROCESSES")
  return Launch(source, address, n, pid, devices, expected if expected is not None else n)


def check_world(launch: Launch, process_count: int, process_index: int) -> None:
  """Fail fast when jax's view of the world differs from what the launch promised."""
  if launch.expected_processes is not None and process_count != launch.expected_processes:
    raise LaunchError(
        f"jax sees {process_count} processes but the launch ({launch.source}) expected "
        f"{launch.expected_processes}: start the same command on every host (e.g. "
        f"`gcloud ... ssh --worker=all`, `srun`), and check --num_processes/--expected_processes")
  if launch.process_id is not None and process_index != launch.process_id:
    raise LaunchError(f"jax assigned process index {process_index}, but --process_id / "
                      f"JAX_PROCESS_ID is {launch.process_id}")


def _say(msg: str) -> None:
  """Start-up lines go to stdout from EVERY process (later logging is process 0 only)."""
  sys.stdout.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
  sys.stdout.flush()


def _use_gloo_on_cpu(environ: Mapping[str, str]) -> bool:
  """Cross-process collectives on the CPU backend need gloo (tests and CPU clusters)."""
  platforms = environ.get("JAX_PLATFORMS", "").replace(" ", "").split(",")
  return platforms == ["cpu"]


def initialize(launch: Launch, timeout_s: int = 300,
               environ: Mapping[str, str] | None = None) -> None:
  """`jax.distributed.initialize` under a watchdog: exits with EXIT_INIT_TIMEOUT and a message
  naming the coordinator and process count if the peers do not all arrive in time."""
  import jax  # Imported here: callers may set XLA_FLAGS / JAX_PLATFORMS first.

  environ = os.environ if environ is None else environ
  if not launch.multi_process:
    return
  if _use_gloo_on_cpu(environ):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  who = (f"process {launch.process_id} of {launch.num_processes}"
         if launch.num_processes else f"a {launch.source} process (ids auto-detected)")
  where = launch.coordinator_address or "auto-detected"
  _say(f"[distributed] {who} joining via {launch.source}: coordinator {where}, "
       f"timeout {timeout_s} s")
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout_s):
      sys.stderr.write(
          f"\n[distributed] ERROR: jax.distributed.initialize did not finish within {timeout_s} s "
          f"({who}, coordinator {where}). Every process must be started with the same "
          f"coordinator address and process count, process 0 must be running, and its port "
          f"must be reachable from every host. Exiting.\n")
      sys.stderr.flush()
      os._exit(EXIT_INIT_TIMEOUT)

  threading.Thread(target=watchdog, daemon=True, name="distributed-init-watchdog").start()
  kwargs = dict(coordinator_address=launch.coordinator_address,
                num_processes=launch.num_processes, process_id=launch.process_id,
                initialization_timeout=timeout_s + 30)  # jax's own abort is the backstop.
  if launch.local_device_ids is not None:
    kwargs["local_device_ids"] = list(launch.local_device_ids)
  try:
    jax.distributed.initialize(**kwargs)
  finally:
    done.set()


def describe_devices() -> str:
  import jax
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  ids = [d.id for d in local]
  return (f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local "
          f"{'/'.join(kinds)} devices (ids {_ranges(ids)}), {jax.device_count()} in total, "
          f"platform {jax.default_backend()}")


def _ranges(ids: Sequence[int]) -> str:
  ids = sorted(ids)
  if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
    return f"{ids[0]}-{ids[-1]}"
  return ",".join(map(str, ids))


def start(mode: str = "auto", coordinator_address: str = "", num_processes: int = -1,
          process_id: int = -1, local_device_ids: str = "", expected_processes: int = -1,
          timeout_s: int = 300) -> Launch:
  """Detect, initialise, log this process's devices, and check the process count."""
  launch = detect(mode, coordinator_address, num_processes, process_id, local_device_ids,
                  expected_processes)
  initialize(launch, timeout_s)
  import jax
  _say(f"[distributed] {describe_devices()}")
  check_world(launch, jax.process_count(), jax.process_index())
  return launch
