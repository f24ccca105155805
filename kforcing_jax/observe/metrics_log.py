"""What the user sees: periodic progress lines with ETA, metrics as JSON lines, a loss plot.

Only process 0 writes; other processes get no-op writers so multi-host runs log once.
"""

import json
import logging
import os
import sys
import time
from typing import Callable

import jax

from kforcing_jax.observe import report

log = logging.getLogger("kforcing_jax")


def configure_logging() -> None:
  """Our progress lines on stdout (process 0 only); library chatter (Orbax, absl) muted."""
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
  log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # A clean console: jax reports the TPU backend it could not find on every CPU/GPU start, and
  # tfds repeats "Using custom data configuration" for every split it opens.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropRepeats) for f in absl_logger.filters):
    absl_logger.addFilter(_DropRepeats())
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


class _DropRepeats(logging.Filter):
  """Drops library lines that say nothing new after their first occurrence."""
  PREFIXES = ("Using custom data configuration",)

  def __init__(self):
    super().__init__()
    self.seen = set()

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    for prefix in self.PREFIXES:
      if msg.startswith(prefix):
        if prefix in self.seen:
          return False
        self.seen.add(prefix)
    return True


class MetricsWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl, and mirrors every numeric
  field as a TensorBoard scalar "<stage>/<field>" under <workdir>/tensorboard/ (tensorboardX:
  no TensorFlow needed). `tensorboard --logdir <workdir>/tensorboard` shows the curves."""

  def __init__(self, path: str, tensorboard: bool = True):
    self.path = path
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(os.path.dirname(os.path.abspath(path)),
                                              "tensorboard"))

  def drop_after(self, stage: str, step: int) -> None:
    """On resume, forget lines of `stage` newer than the restored step (they will be redone)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = [line for line in read_jsonl(self.path)
            if not (line.get("stage") == stage and line.get("step", 0) > step)]
    with report.atomic_open(self.path) as f:
      for line in kept:
        f.write(json.dumps(line) + "\n")

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None and "step" in record:
      stage = record.get("stage", "run")
      for key, value in record.items():
        if key not in ("step", "stage") and isinstance(value, (int, float)):
          self._tb.add_scalar(f"{stage}/{key}", value, record["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _clock(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Progress:
  """The one progress display of long loops: training steps, the jobs of benchmarks,
  evaluations and studies, generation batches.

  `tick(done)` returns the rate and ETA measured since the previous tick, so a first tick that
  includes compilation does not skew later ETAs. `step(what)` counts one finished job and emits
  "[i/n] what | elapsed 12s, ETA 34s" (ETA from the mean time per job: jobs differ, and a
  mean over all of them is the steadier guess).
  """

  def __init__(self, total: int, emit: Callable[[str], None] | None = None, start: int = 0):
    self.total, self.done, self.emit = total, start, emit or log.info
    self.start_time = self.last_time = time.perf_counter()
    self.start, self.last = start, start

  def tick(self, done: int) -> dict:
    now = time.perf_counter()
    rate = max(done - self.last, 1) / max(now - self.last_time, 1e-9)
    self.done, self.last, self.last_time = done, done, now
    return {"per_s": rate, "eta_s": (self.total - done) / rate,
            "elapsed_s": now - self.start_time}

  def step(self, what: str) -> None:
    self.done += 1
    el = time.perf_counter() - self.start_time
    eta = el / (self.done - self.start) * max(self.total - self.done, 0)
    self.emit(f"[{self.done}/{self.total}] {what} | elapsed {el:.0f}s, ETA {eta:.0f}s")

  def line(self, prefix: str, done: int, detail: str, eta_s: float) -> str:
    """A tick's line: "prefix done/total (pct%) detail | ETA 1m05s"."""
    return (f"{prefix} {done}/{self.total} ({100.0 * done / max(self.total, 1):.0f}%) "
            f"{detail} | ETA {_clock(eta_s)}")
