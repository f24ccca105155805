"""What every command-line entry point shares: user errors as one line, internal errors in full.

  from kforcing_jax import cli
  if __name__ == "__main__":
    cli.run(main)

A user error (config_check.UserError: a bad config value, a malformed checkpoint; or a file that
is missing or already there) prints `error: <message>` on stderr and exits with status 2. Any
other exception is a bug and keeps its traceback. A `--config` override naming no field
(`--config.train.batch_size=0`) or a missing config file is a user error too, found while the
flags are parsed: `error: config.train.batch_size: no such field; did you mean
config.batch_size?`.
"""

import difflib
import logging
import os
import sys
from typing import Callable, Iterator, Sequence

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

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
  """absl's app.run(main) (global flags), with `guarded` user errors and `parse_flags`."""
  app.run(lambda argv: guarded(lambda: main(argv)), flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, except that a config-file flag's missing file or mistyped override
  (which ml_collections reports as a traceback, the former only once the config is read)
  prints one line and exits with status 2."""
  message = missing_config_file(argv, flags.FLAGS)
  if message is None:
    try:
      return app.parse_flags_with_usage(list(argv))
    except Exception:
      message = unknown_override(argv, flags.FLAGS)
      if message is None:
        raise
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_file_flags(argv: Sequence[str], flag_values: flags.FlagValues):
  """(name, flag, its file argument) of each config-file flag given on the command line."""
  for name in list(flag_values):
    flag = flag_values[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser):
      path = _flag_argument(argv, name)
      if path is not None:
        yield name, flag, path


def missing_config_file(argv: Sequence[str], flag_values: flags.FlagValues) -> str | None:
  for name, _, path in _config_file_flags(argv, flag_values):
    if not os.path.isfile(path.split(":", 1)[0]):
      return f"--{name} {path}: no such config file"
  return None


def unknown_override(argv: Sequence[str], flag_values: flags.FlagValues) -> str | None:
  """The first `--<config flag>.<field>` override naming no field of its config, in one line
  with the nearest existing field's full dotted name; None when every override names a field
  (the parse failed for another reason)."""
  for name, flag, path in _config_file_flags(argv, flag_values):
    overrides = [a[len(name) + 3:].split("=", 1)[0] for a in argv
                 if a.startswith(f"--{name}.")]
    if not overrides:
      continue
    config = flag.parser.parse(path)
    for override in overrides:
      if _has_field(config, override.split(".")):
        continue
      near = difflib.get_close_matches(override, list(dotted_fields(config)), n=1, cutoff=0.6)
      hint = f"; did you mean {name}.{near[0]}?" if near else ""
      return f"{name}.{override}: no such field{hint}"
  return None


def dotted_fields(config, prefix: str = "") -> Iterator[str]:
  """The dotted name of every field of a ConfigDict, groups and their fields alike."""
  for key in config.keys():
    yield prefix + key
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      yield from dotted_fields(value, prefix + key + ".")


def _has_field(config, parts: list[str]) -> bool:
  for part in parts:
    if not isinstance(config, config_dict.ConfigDict) or part not in config:
      return False
    config = config[part]
  return True


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
  """The last value given to --name on the command line (--name=V or --name V)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value
