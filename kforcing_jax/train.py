"""Entry point: python -m kforcing_jax.train --config configs/kjv_tiny.py --workdir DIR.

Kept short on purpose: the logic lives in `trainer.py`, importable from notebooks and tests.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # Imported after flags so XLA_FLAGS set by a launcher take effect.
  from kforcing_jax import trainer

  level = logging.INFO if jax.process_index() == 0 else logging.WARNING
  logging.basicConfig(level=level, stream=sys.stdout,
                      format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
  trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
