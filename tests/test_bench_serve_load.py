"""The load benchmark runs end to end against a live server (in this process, loopback) and
writes its documented outputs: per concurrency level tokens/s, TTFT / TPOT / ITL percentiles and
the offline decoder's tokens/s beside them. No timing assertions: a handful of requests only
checks that the script works and its JSON keeps its schema."""

import json
import math
import os
import subprocess
import sys

import pytest

from test_server_protocol import Live, _engine
from test_serving_cli import workdir  # noqa: F401  (a module-scoped fixture: tiny work dir)

# Slow tier (-m 'not slow' skips it): a server, and the benchmark in a fresh process.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"concurrency", "requests", "ok", "errors", "output_tokens_per_s", "ttft_p50_s",
          "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s",
          "latency_p99_s", "offline_batch", "offline_tokens_per_s", "server_over_offline"}


def test_serve_load_reports_latency_and_the_offline_decoder(workdir, tmp_path):  # noqa: F811
  eng, tok = _engine(workdir, slots=2)
  live = Live(eng, tok)
  out = tmp_path / "load.json"
  try:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, "-m", "kforcing_jax.bench.serve_load", f"--url={live.url}",
         f"--workdir={workdir}", "--concurrency=1,3", "--requests=3", "--max_tokens=6",
         "--offline_reps=1", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300)
  finally:
    live.stop()
    eng.shutdown(drain=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "TPOT50 ms" in run.stdout and "srv/off" in run.stdout, run.stdout
  result = json.loads(out.read_text())
  assert {"command", "commit", "machine", "date"} <= set(result["provenance"])
  assert result["offline"]["k"] == 2 and result["max_tokens"] == 6
  rows = result["rows"]
  assert [r["concurrency"] for r in rows] == [1, 3]
  assert [r["offline_batch"] for r in rows] == [1, 2]  # min(concurrency, slots)
  for r in rows:
    assert FIELDS <= set(r), r
    assert r["errors"] == 0 and r["ok"] == 3 and r["output_tokens"] > 0
    assert r["offline_tokens_per_s"] > 0 and r["server_over_offline"] > 0
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["latency_p99_s"]
    assert math.isnan(r["tpot_p50_s"]) or r["tpot_p50_s"] > 0
  assert (tmp_path / "load.png").stat().st_size > 0


def test_offline_figure_of_a_lossless_server_is_the_verified_decoder(workdir):  # noqa: F811
  # In a fresh process: the benchmark module defines absl flags that other modules also define.
  code = ("import sys; from kforcing_jax.bench import serve_load as s; "
          "from kforcing_jax.serving import speculative; "
          "o = s.Offline(sys.argv[1], 'pflm_verified:k2', 2, 6, reps=1); "
          "assert isinstance(o.engine, speculative.VerifiedEngine) and o.spec.gamma == 2; "
          "assert o.tokens_per_s(2) > 0")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, "-c", code, workdir], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
