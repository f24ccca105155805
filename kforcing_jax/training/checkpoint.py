"""Orbax checkpoints: train state + data-iterator state + the model config as JSON.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash
mid-save leaves the previous checkpoint as the latest usable one (tested). Restores always go
into an abstract state built for the CURRENT mesh, so a checkpoint written on a (4, 2) mesh
restores on (2, 4) or on one device.
"""

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from kforcing_jax.observe import report

MODEL_CONFIG_FILE = "model_config.json"


class Checkpointer:
  """One CheckpointManager per stage directory (e.g. <workdir>/checkpoints/teacher)."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, data_iter=None) -> None:
    """Save synchronously; meta must hold 'model_config' (a dict), also written as plain JSON."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    if "model_config" in meta and jax.process_index() == 0:
      report.write_json(os.path.join(self.directory, MODEL_CONFIG_FILE), meta["model_config"],
                        indent=2, sort_keys=True)

  def restore(self, step: int, abstract_state, data_iter=None) -> tuple[Any, dict]:
    """Restore into `abstract_state` (ShapeDtypeStructs with target shardings); the data
    iterator, if given, is restored in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      restore_iterator(epath.Path(self.directory) / str(step) / "data_iter", data_iter)
    return out["state"], out["meta"]

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def close(self) -> None:
    self.manager.close()


def restore_iterator(directory: epath.Path, data_iter) -> None:
  """Restore a grain iterator saved by any number of processes.

  grain writes one `process_<i>-of-<n>.json` per process and its own restore reads only the
  file of the current (i, n), so a 2-process checkpoint could not resume in 1 process. Every
  process's state is the same (pipeline.py: all processes walk one global batch stream), so
  this process's own file is used when present, else the first one.
  """
  own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  found = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
  if not found:
    raise FileNotFoundError(f"no data-iterator state (process_*-of-*.json) in {directory}")
  data_iter.set_state(json.loads(found[0].read_text()))
