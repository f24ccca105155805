"""Test setup: 8 fake CPU devices and one compilation cache, set before jax is imported."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the session, inherited by the CLI processes the tests start: the
# same stage programs (train step, decode, scorer) compile once per suite, not once per process
# or per test. A fresh directory each session, so CI's timing is a cold start's. Executables
# loaded from it are the ones compiled, so results are bit-identical.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="kforcing-jax-xla-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# A size bound turns on the cache's file lock: pytest-xdist workers and a test's processes
# write the same entries at once.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

