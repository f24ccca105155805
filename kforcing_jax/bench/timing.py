"""The one timing harness of the benchmarks: round-robin medians of jitted calls.

Timing on shared machines drifts by tens of percent over minutes, so every benchmark that
compares things times them interleaved: each repetition runs every call once in turn, and a
slow spell hits all of them alike instead of biasing whichever one it overlaps.
"""

import os
import statistics
import time
from typing import Any, Callable

import jax

# A timer is (run, prepare): `run()` when prepare is None, else `run(prepare())` with the
# prepared input made ready outside the timed region (e.g. a prefilled decode state).
Timer = tuple[Callable[..., Any], Callable[[], Any] | None]

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Sums jax.monitoring's trace / lowering / compile durations while `on`."""

  def __init__(self):
    self.total, self.on = 0.0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
    del kwargs
    if self.on and event in _COMPILE_EVENTS:
      self.total += duration_secs

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


def round_robin(methods: dict[str, dict[str, Timer]], reps: int,
                progress: Callable[[str], None] | None = None,
                warmup: int = 1) -> dict[str, dict[str, dict]]:
  """{method: {timer: stats}} over one compile call, `warmup` untimed calls and `reps` timed
  rounds of every (method, timer) in turn. stats: seconds (median), min_seconds, times,
  first_call_s and compile_s (jax.monitoring's trace + lower + compile time of the first call;
  first call minus the median when the listener saw nothing), reps, loadavg_1m."""
  clock = CompileClock()
  times = {m: {t: [] for t in timers} for m, timers in methods.items()}
  first = {m: {} for m in methods}
  compile_s = {m: {} for m in methods}
  rounds = 1 + warmup + reps
  try:
    for i in range(rounds):
      for m, timers in methods.items():
        for t, (run, prepare) in timers.items():
          arg = prepare() if prepare else None
          if arg is not None:
            jax.block_until_ready(arg)
          clock.total, clock.on = 0.0, i == 0
          t0 = time.perf_counter()
          jax.block_until_ready(run(arg) if prepare else run())
          dt = time.perf_counter() - t0
          clock.on = False
          if i == 0:
            first[m][t], compile_s[m][t] = dt, clock.total
          elif i > warmup:
            times[m][t].append(dt)
      if progress is not None:
        kind = "compile" if i == 0 else "warm-up" if i <= warmup else "timed"
        progress(f"round {i + 1}/{rounds} ({kind})")
  finally:
    clock.close()
  load = os.getloadavg()[0]
  out = {}
  for m, ts in times.items():
    out[m] = {}
    for t, v in ts.items():
      med = statistics.median(v)
      out[m][t] = {"seconds": med, "min_seconds": min(v), "times": v, "reps": reps,
                   "first_call_s": first[m][t],
                   "compile_s": compile_s[m][t] or max(first[m][t] - med, 0.0),
                   "loadavg_1m": load}
  return out
