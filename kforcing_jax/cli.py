"""What every command-line entry point shares: user errors as one line, internal errors in full.

  from kforcing_jax import cli
  if __name__ == "__main__":
    cli.run(main)

A user error (config_check.UserError: a bad config value, a malformed checkpoint; or a file that
is missing or already there) prints `error: <message>` on stderr and exits with status 2. Any
other exception is a bug and keeps its traceback.
"""

import logging
import sys
from typing import Callable

from absl import app

from kforcing_jax.config import check as config_check

USER_ERRORS = (config_check.UserError, FileNotFoundError, FileExistsError)


def guarded(fn: Callable[[], object]):
  """Run fn; a user error prints one line and exits with status 2."""
  # jax logs the TPU backend it could not find on every CPU/GPU start; not news to a user.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  try:
    return fn()
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run(main) (global flags), with `guarded` user errors."""
  app.run(lambda argv: guarded(lambda: main(argv)))
