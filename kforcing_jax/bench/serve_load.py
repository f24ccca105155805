"""Load benchmark of a running `python -m kforcing_jax.serve` with the official `openai` client,
against the offline decoder on the same machine.

  python -m kforcing_jax.bench.serve_load --url http://127.0.0.1:8000 --workdir runs/kjv \
      --concurrency 1,4,16,64 --requests 128 --max_tokens 64 --out load.json
  # a second server on the same table and plot:
  python -m kforcing_jax.bench.serve_load --url http://127.0.0.1:8001 --include load.json \
      --out load_both.json

Per concurrency level C it sends --requests streaming completions (a built-in set of prompts),
at most C in flight (async client, loopback only), each bounded by --timeout_s, and reports
what vLLM's serving benchmark reports: output tokens/s, requests/s, errors, and p50/p99 of
  TTFT  time to first token (request sent -> first text chunk),
  TPOT  time per output token after the first: (latency - TTFT) / (tokens - 1) per request,
  ITL   inter-token latency: the gaps between a stream's text chunks (one chunk carries a
        block, up to k tokens, so the gaps are per block),
and end-to-end latency. Output tokens are the server's own count (the stream's final `usage`
chunk, stream_options.include_usage).

With --workdir (the served stage's work dir) it also measures, in the same run on the same
machine, the offline decoder (`decode.Engine.generate`, or `VerifiedEngine.generate` for a
server of a lossless method) on the same stage and k: a batch of
min(C, server slots) of the same prompts' ids, max_tokens tokens per row (no EOS stop), once to
compile, then timed over --offline_reps calls back to back, host transfers included, while the
server is idle between levels; `server/offline` is the served tokens/s over it. Prints a table;
writes the JSON (report.write_result: with provenance) and a PNG of tokens/s and p99 TTFT vs
concurrency (same name, .png).
"""

import asyncio
import json
import os
import statistics
import time
import urllib.parse
import urllib.request

from absl import flags

from kforcing_jax import cli
from kforcing_jax.observe import report

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "Server base URL (loopback only).")
_CONC = flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "Concurrency levels.")
_N = flags.DEFINE_integer("requests", 64, "Requests per concurrency level.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "max_tokens of every request.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 120.0, "Per-request timeout.")
_BUDGET = flags.DEFINE_float("budget_s", 1800.0, "Stop starting new levels after this long.")
_OUT = flags.DEFINE_string("out", "serve_load.json", "Output JSON (PNG beside it).")
_LABEL = flags.DEFINE_string("label", "", "Name of this server in the table (default: model).")
_WORKDIR = flags.DEFINE_string("workdir", "", "The served stage's work dir: also measure the "
                                "offline decoder there (empty: server only).")
_REPS = flags.DEFINE_integer("offline_reps", 3, "Timed offline generate calls per level.")
_INCLUDE = flags.DEFINE_list("include", [], "JSON files of earlier runs (other servers) to show "
                             "in the same table and plot.")

PROMPTS = ("In the beginning God created", "And the LORD spake unto Moses, saying",
           "Blessed are the poor in spirit", "And it came to pass in those days",
           "The LORD is my shepherd", "Then answered Jesus and said unto them",
           "Now the serpent was more subtil", "And the children of Israel went")


def percentile(xs: list[float], q: float) -> float:
  if not xs:
    return float("nan")
  xs = sorted(xs)
  i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
  return xs[i]


async def one_request(client, model: str, i: int, max_tokens: int, timeout: float) -> dict:
  """One streamed completion: its latency, TTFT, the gaps between its text chunks (ITL) and
  TPOT."""
  t0 = time.perf_counter()
  arrivals, tokens, text, reason = [], 0, "", None
  try:
    stream = await client.completions.create(
        model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, seed=i,
        stream=True, stream_options={"include_usage": True}, timeout=timeout)
    async for chunk in stream:
      if chunk.usage is not None:
        tokens = chunk.usage.completion_tokens
      for c in chunk.choices:
        if c.text:
          arrivals.append(time.perf_counter() - t0)
        text += c.text
        reason = c.finish_reason or reason
    latency = time.perf_counter() - t0
    first = arrivals[0] if arrivals else None
    tpot = (latency - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"ok": True, "latency_s": latency, "ttft_s": first, "tpot_s": tpot,
            "itl_s": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens,
            "finish_reason": reason, "chars": len(text)}
  except Exception as e:  # counted as an error, the run goes on
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300],
            "latency_s": time.perf_counter() - t0}


async def run_level(url: str, model: str, concurrency: int, n: int, max_tokens: int,
                    timeout: float) -> dict:
  from openai import AsyncOpenAI

  client = AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
  sem = asyncio.Semaphore(concurrency)

  async def bounded(i):
    async with sem:
      return await one_request(client, model, i, max_tokens, timeout)

  t0 = time.perf_counter()
  results = await asyncio.gather(*(bounded(i) for i in range(n)))
  wall = time.perf_counter() - t0
  await client.close()
  ok = [r for r in results if r["ok"]]
  out_tokens = sum(r["tokens"] for r in ok)
  series = {"ttft": [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
            "tpot": [r["tpot_s"] for r in ok if r["tpot_s"] is not None],
            "itl": [x for r in ok for x in r["itl_s"]],
            "latency": [r["latency_s"] for r in ok]}
  errors = [r["error"] for r in results if not r["ok"]]
  row = {"concurrency": concurrency, "requests": n, "ok": len(ok), "errors": len(errors),
         "error_examples": errors[:3], "wall_s": wall, "requests_per_s": len(ok) / wall,
         "output_tokens_per_s": out_tokens / wall, "output_tokens": out_tokens}
  for name, xs in series.items():
    row[f"{name}_mean_s"] = statistics.fmean(xs) if xs else float("nan")
    row[f"{name}_p50_s"], row[f"{name}_p99_s"] = percentile(xs, 50), percentile(xs, 99)
  return row


class Offline:
  """The offline decoder of what the server serves: tokens/s of `decode.Engine.generate` on the
  served stage, or of `VerifiedEngine.generate` for a lossless method (model
  "<method>:<drafter stage>"), on a batch of the benchmark's prompts (their ids as the server's
  tokenizer makes them), at the server's k (gamma)."""

  def __init__(self, workdir: str, model: str, k: int, max_tokens: int, reps: int):
    from kforcing_jax.serving import decode, methods
    from kforcing_jax.training import stage_io

    method, _, stage = model.rpartition(":")
    loaded = stage_io.load_stage(workdir, stage)
    if method:
      teacher = methods.load_verifier(workdir, loaded, method)
      self.engine = methods.verified_engine(teacher, method, pflm=loaded, draft=loaded)
      self.spec = methods.verify_spec(method, loaded.k, max_tokens, k=k, gamma=k,
                                      drafter_temps=loaded.temperatures)
    else:
      self.engine = decode.Engine.from_stage(loaded)
      self.spec = decode.DecodeSpec(k=k, max_new_tokens=max_tokens, ar=loaded.k == 0)
    self.prompt_ids = [loaded.tokenizer.encode_prompt(p) for p in PROMPTS]
    self.max_tokens, self.reps = max_tokens, reps

  def tokens_per_s(self, batch: int) -> float:
    """Warm (one call compiles), then `reps` timed calls back to back."""
    ids = [self.prompt_ids[i % len(self.prompt_ids)] for i in range(batch)]
    self.engine.generate(ids, self.spec, seed=0)
    t0 = time.perf_counter()
    for _ in range(self.reps):
      self.engine.generate(ids, self.spec, seed=0)
    return self.reps * batch * self.max_tokens / (time.perf_counter() - t0)


# (header, format, field, scale): TTFT and latency in s, TPOT and ITL in ms.
TABLE = [("server", "<10", "server", None), ("conc", ">5", "concurrency", None),
         ("req", ">5", "requests", None), ("err", ">4", "errors", None),
         ("out tok/s", ">10.0f", "output_tokens_per_s", 1),
         ("offline", ">9.0f", "offline_tokens_per_s", 1),
         ("srv/off", ">8.2f", "server_over_offline", 1),
         ("TTFT50 s", ">9.3f", "ttft_p50_s", 1), ("TTFT99 s", ">9.3f", "ttft_p99_s", 1),
         ("TPOT50 ms", ">10.1f", "tpot_p50_s", 1e3), ("TPOT99 ms", ">10.1f", "tpot_p99_s", 1e3),
         ("ITL50 ms", ">9.1f", "itl_p50_s", 1e3), ("ITL99 ms", ">9.1f", "itl_p99_s", 1e3),
         ("lat99 s", ">8.2f", "latency_p99_s", 1)]


def table(rows: list[dict]) -> str:
  """One line per (server, concurrency); '-' where a row lacks the field (an older run, or no
  --workdir for the offline columns)."""
  cell = lambda r, field, scale: ("-" if r.get(field) is None else
                                  r[field] if scale is None else r[field] * scale)
  return report.text_table([(h, f) for h, f, _, _ in TABLE],
                           ([cell(r, field, scale) for _, _, field, scale in TABLE] for r in rows))


def plot(rows: list[dict], out_png: str) -> None:
  """Output tokens/s (the offline decoder's dashed, where measured) and p99 TTFT vs
  concurrency, one colour per server."""
  with report.figure(out_png, 2, (10, 4), "serving load (openai client, loopback)") as (
      _, _, (a, b)):
    for i, server in enumerate(sorted({r["server"] for r in rows})):
      rs = report.by(rows, "concurrency", server=server)
      xs = [r["concurrency"] for r in rs]
      a.plot(xs, [r["output_tokens_per_s"] for r in rs], "o-", color=f"C{i}", label=server)
      off = [(x, r["offline_tokens_per_s"]) for x, r in zip(xs, rs)
             if r.get("offline_tokens_per_s") is not None]
      if off:
        a.plot(*zip(*off), "x--", color=f"C{i}", label=f"{server} offline (batch = min(C, slots))")
      if all("ttft_p99_s" in r for r in rs):
        b.plot(xs, [r["ttft_p99_s"] for r in rs], "o-", color=f"C{i}", label=f"{server} p99")
    for ax, label in ((a, "output tokens/s"), (b, "time to first token, p99 (s)")):
      report.finish_axes(ax, "concurrent requests", label, log2_x=True)


def main(argv):
  del argv
  # The server holds its device memory already: JAX in this process allocates as it goes.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  from kforcing_jax.config import check as config_check
  from kforcing_jax.observe import metrics_log

  metrics_log.configure_logging()
  log = metrics_log.log
  url = _URL.value
  host = urllib.parse.urlparse(url).hostname
  if host not in ("127.0.0.1", "localhost", "::1"):
    raise config_check.UserError(f"--url {url}: the load benchmark only targets the loopback "
                                 "address (127.0.0.1)")
  try:
    levels = [int(c) for c in _CONC.value]
  except ValueError:
    raise config_check.UserError(f"--concurrency must be integers, got {_CONC.value}") from None
  if any(c < 1 for c in levels) or _N.value < 1 or _REPS.value < 1:
    raise config_check.UserError("--concurrency, --requests and --offline_reps must be >= 1")
  try:
    with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as r:
      health = json.load(r)
  except OSError as e:
    raise config_check.UserError(f"no server answers at {url} ({e}); start one with "
                                 "python -m kforcing_jax.serve") from None
  model = health["model"]
  label = _LABEL.value or model
  offline = None
  if _WORKDIR.value:
    log.info("loading %s from %s for the offline decoder (k=%d)", model, _WORKDIR.value,
             health["k"])
    offline = Offline(_WORKDIR.value, model, health["k"], _MAX_TOKENS.value, _REPS.value)
  rows, t_start = [], time.perf_counter()
  note = metrics_log.Progress(len(levels)).step
  for i, c in enumerate(levels):
    if time.perf_counter() - t_start > _BUDGET.value:
      log.warning("--budget_s reached: skipping concurrency %s", levels[i:])
      break
    row = asyncio.run(run_level(url, model, c, _N.value, _MAX_TOKENS.value, _TIMEOUT.value))
    row["server"] = label
    if offline is not None:  # (the server is idle now: its level has finished)
      row["offline_batch"] = min(c, health["slots"])
      row["offline_tokens_per_s"] = offline.tokens_per_s(row["offline_batch"])
      row["server_over_offline"] = row["output_tokens_per_s"] / row["offline_tokens_per_s"]
    rows.append(row)
    note(f"{label} concurrency {c}: {row['output_tokens_per_s']:.0f} output tokens/s"
         + (f" ({row['server_over_offline']:.2f}x offline)" if offline else "")
         + f", TTFT p99 {row['ttft_p99_s']:.3f} s, {row['errors']} errors")
  shown = list(rows)
  for path in _INCLUDE.value:
    with open(path, encoding="utf-8") as f:
      shown += json.load(f)["rows"]
  print(table(shown))
  out = os.path.abspath(_OUT.value)
  report.write_result(out, {
      "url": url, "health": health, "max_tokens": _MAX_TOKENS.value,
      "offline": None if offline is None else {
          "workdir": _WORKDIR.value, "k": health["k"], "reps": _REPS.value,
          "how": "decode.Engine.generate, batch = min(concurrency, slots) of the same prompts, "
                 "max_tokens per row without EOS, one warm call then reps timed back to back"},
      "rows": rows})
  png = os.path.splitext(out)[0] + ".png"
  plot(shown, png)
  log.info("wrote %s and %s", out, png)


if __name__ == "__main__":
  cli.run(main)
