"""Entry point: python -m kforcing_jax.train --config configs/kjv_tiny.py --workdir DIR.

Kept short on purpose: the logic lives in `trainer.py`, importable from notebooks and tests.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from kforcing_jax import trainer  # Imported after flag parsing (XLA_FLAGS from launchers).

  trainer.configure_logging()
  trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
