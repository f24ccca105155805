"""Load benchmark of a running `python -m kforcing_jax.serve` with the official `openai` client.

  python -m kforcing_jax.bench.serve_load --url http://127.0.0.1:8000 \
      --concurrency 1,4,16,64 --requests 128 --max_tokens 64 --out load.json
  # a second server on the same table and plot:
  python -m kforcing_jax.bench.serve_load --url http://127.0.0.1:8001 --include load.json \
      --out load_both.json

Per concurrency level C it sends --requests streaming completions (prompts are held-out-style
text lines from --prompts, or a built-in set), at most C in flight (async client, loopback
only), each bounded by --timeout_s, and reports requests/s, output tokens/s, time to first token
p50/p99, latency p50/p99 and errors. Output tokens are the server's own count (the stream's
final `usage` chunk, stream_options.include_usage). Prints a table; writes JSON and a PNG of
output tokens/s and latency vs concurrency (same name, .png).
"""

import asyncio
import json
import os
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
  t0 = time.perf_counter()
  first, tokens, text, reason = None, 0, "", None
  try:
    stream = await client.completions.create(
        model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, seed=i,
        stream=True, stream_options={"include_usage": True}, timeout=timeout)
    async for chunk in stream:
      if chunk.usage is not None:
        tokens = chunk.usage.completion_tokens
      for c in chunk.choices:
        if c.text and first is None:
          first = time.perf_counter() - t0
        text += c.text
        reason = c.finish_reason or reason
    return {"ok": True, "latency_s": time.perf_counter() - t0, "ttft_s": first,
            "tokens": tokens, "finish_reason": reason, "chars": len(text)}
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
  lat = [r["latency_s"] for r in ok]
  ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
  errors = [r["error"] for r in results if not r["ok"]]
  return {"concurrency": concurrency, "requests": n, "ok": len(ok), "errors": len(errors),
          "error_examples": errors[:3], "wall_s": wall, "requests_per_s": len(ok) / wall,
          "output_tokens_per_s": out_tokens / wall, "output_tokens": out_tokens,
          "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
          "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99)}


TABLE_COLUMNS = [("server", "<10"), ("conc", ">6"), ("req", ">6"), ("err", ">5"),
                 ("req/s", ">8.2f"), ("out tok/s", ">11.0f"), ("TTFT p50", ">10.3f"),
                 ("TTFT p99", ">10.3f"), ("lat p50", ">9.2f"), ("lat p99", ">9.2f")]
TABLE_FIELDS = ["server", "concurrency", "requests", "errors", "requests_per_s",
                "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                "latency_p99_s"]


def table(rows: list[dict]) -> str:
  return report.text_table(TABLE_COLUMNS, ([r[f] for f in TABLE_FIELDS] for r in rows))


def plot(rows: list[dict], out_png: str) -> None:
  with report.figure(out_png, 2, (10, 4), "serving load (openai client, loopback)") as (
      _, _, (a, b)):
    for i, server in enumerate(sorted({r["server"] for r in rows})):
      rs = report.by(rows, "concurrency", server=server)
      xs = [r["concurrency"] for r in rs]
      a.plot(xs, [r["output_tokens_per_s"] for r in rs], "o-", color=f"C{i}", label=server)
      b.plot(xs, [r["latency_p50_s"] for r in rs], "o-", color=f"C{i}", label=f"{server} p50")
      b.plot(xs, [r["latency_p99_s"] for r in rs], "x--", color=f"C{i}", label=f"{server} p99")
    for ax, label in ((a, "output tokens/s"), (b, "latency (s)")):
      report.finish_axes(ax, "concurrent requests", label, log2_x=True)


def main(argv):
  del argv

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
  if any(c < 1 for c in levels) or _N.value < 1:
    raise config_check.UserError("--concurrency and --requests must be >= 1")
  try:
    with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as r:
      health = json.load(r)
  except OSError as e:
    raise config_check.UserError(f"no server answers at {url} ({e}); start one with "
                                 "python -m kforcing_jax.serve") from None
  model = health["model"]
  label = _LABEL.value or model
  rows, t_start = [], time.perf_counter()
  note = metrics_log.Progress(len(levels)).step
  for i, c in enumerate(levels):
    if time.perf_counter() - t_start > _BUDGET.value:
      log.warning("--budget_s reached: skipping concurrency %s", levels[i:])
      break
    row = asyncio.run(run_level(url, model, c, _N.value, _MAX_TOKENS.value, _TIMEOUT.value))
    row["server"] = label
    rows.append(row)
    note(f"{label} concurrency {c}: {row['output_tokens_per_s']:.0f} output tokens/s, "
         f"{row['errors']} errors")
  shown = list(rows)
  for path in _INCLUDE.value:
    with open(path, encoding="utf-8") as f:
      shown += json.load(f)["rows"]
  print(table(shown))
  out = os.path.abspath(_OUT.value)
  report.write_result(out, {"url": url, "health": health, "max_tokens": _MAX_TOKENS.value,
                            "rows": rows})
  png = os.path.splitext(out)[0] + ".png"
  plot(shown, png)
  log.info("wrote %s and %s", out, png)


if __name__ == "__main__":
  cli.run(main)
