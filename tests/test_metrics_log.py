"""metrics.jsonl and its TensorBoard mirror hold the same numbers."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from kforcing_jax.observe import metrics_log


def _read_events(path):
  """TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_jsonl_and_tensorboard_scalars(tmp_path):
  w = metrics_log.MetricsWriter(str(tmp_path / "metrics.jsonl"))
  w.write({"stage": "teacher", "step": 10, "loss": 2.5, "lr": 1e-3})
  w.write({"stage": "k2", "step": 4, "val_nll_1": 1.25, "note": "not a number"})
  w.drop_after("teacher", 5)  # a resume from step 5 forgets the teacher's step-10 line
  w.close()
  assert metrics_log.read_jsonl(w.path) == [
      {"stage": "k2", "step": 4, "val_nll_1": 1.25, "note": "not a number"}]
  (events,) = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  scalars = _read_events(events)
  assert ("teacher/loss", 10, 2.5) in scalars
  assert ("k2/val_nll_1", 4, 1.25) in scalars
  assert not any(tag.endswith("/note") for tag, _, _ in scalars)


def test_progress_rate_eta_and_job_lines(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: now[0])
  lines = []
  p = metrics_log.Progress(100, emit=lines.append, start=20)
  now[0] = 110.0  # 10 steps in 10 s (e.g. including compilation)...
  assert p.tick(30) == {"per_s": 1.0, "eta_s": 70.0, "elapsed_s": 10.0}
  now[0] = 115.0  # ... then 20 steps in 5 s: the ETA follows the recent rate
  assert p.tick(50) == {"per_s": 4.0, "eta_s": 12.5, "elapsed_s": 15.0}
  assert p.line("[k4] step", 50, "loss 1.0000", 72.5) == \
      "[k4] step 50/100 (50%) loss 1.0000 | ETA 1m12s"
  jobs = metrics_log.Progress(4, emit=lines.append)
  now[0] = 125.0
  jobs.step("first")
  now[0] = 135.0
  jobs.step("second")
  assert lines == ["[1/4] first | elapsed 10s, ETA 30s", "[2/4] second | elapsed 20s, ETA 20s"]


def test_round_robin_interleaves_and_reports_medians():
  import jax.numpy as jnp

  from kforcing_jax.bench import timing

  calls = []
  make = lambda name: (lambda: calls.append(name) or jnp.zeros(()), None)
  prepared = []
  prep = (lambda x: calls.append("c") or x, lambda: prepared.append(1) or jnp.ones(()))
  rounds = []
  out = timing.round_robin({"a": {"t": make("a")}, "b": {"t": make("b"), "u": prep}}, reps=3,
                           progress=rounds.append)
  # 1 compile + 1 warm-up + 3 timed rounds, each calling every timer once, in turn.
  assert calls == ["a", "b", "c"] * 5 and len(prepared) == 5
  assert rounds[0] == "round 1/5 (compile)" and rounds[-1] == "round 5/5 (timed)"
  for m, t in (("a", "t"), ("b", "t"), ("b", "u")):
    st = out[m][t]
    assert st["reps"] == 3 and len(st["times"]) == 3
    assert st["min_seconds"] <= st["seconds"] == sorted(st["times"])[1]


def test_loss_curves_put_phases_after_their_stage(tmp_path):
  """A phase k<n>_<p> is drawn after k<n> and its earlier phases, not over them."""
  from kforcing_jax.observe import plots
  assert plots.phase_starts({"teacher": 300, "k2": 40, "k4": 480, "k4_2": 200, "k4_3": 50}) == {
      "k4_2": 480, "k4_3": 680}
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(f'{{"stage": "{s}", "step": {i}, "loss": 1.0}}\n'
                          for s in ("k4", "k4_2") for i in (1, 2)))
  plots.plot_loss_curves(str(path), str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").stat().st_size > 0
