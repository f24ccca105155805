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
