"""GET /metrics: the server's Prometheus metrics, named as vLLM names its own (prefix `kforcing:`)
so the dashboards and alerts operators already have for vLLM read ours with a prefix change.

Each app has its own CollectorRegistry (not prometheus_client's global one): several servers in
one process (tests) do not collide, and a scrape shows one engine. Engine state (running,
waiting, slots, steps, health) is read from `engine.stats()` at scrape time; per-request counts
and latencies are recorded when a request finishes (`ServingMetrics.finished`, called from the
request's callback on the decode thread; prometheus_client is thread-safe).

  kforcing:num_requests_running       gauge    requests holding a slot
  kforcing:num_requests_waiting       gauge    requests queued for a slot
  kforcing:num_slots                  gauge    slots (--slots): the decode batch
  kforcing:engine_up                  gauge    1 while the decode loop can serve, else 0
  kforcing:decode_steps_total         counter  batched decode steps (k tokens per live slot;
                                               lossless methods: one teacher pass)
  kforcing:spec_decode_num_draft_tokens_total     counter  lossless methods only: drafts
  kforcing:spec_decode_num_accepted_tokens_total  counter  verified and accepted by the teacher
  kforcing:request_success_total      counter  {finished_reason="stop"|"length"}
  kforcing:request_failure_total      counter  {reason="cancelled"|"error"} (client gone /
                                               internal error)
  kforcing:api_requests_total         counter  {endpoint="completions"|"chat", status}: every
                                               HTTP answer, 4xx rejections included
  kforcing:prompt_tokens_total        counter  prompt tokens of every request that ended
  kforcing:generation_tokens_total    counter  tokens generated (failed requests included)
  kforcing:time_to_first_token_seconds   histogram  submit -> first block (queue + prefill)
  kforcing:time_per_output_token_seconds histogram  (finish - first block) / (tokens - 1)
  kforcing:e2e_request_latency_seconds   histogram  submit -> finish, finished requests

A completion with several prompts is one API request and one engine request per prompt.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kforcing_jax.serving import engine as engine_lib

PREFIX = "kforcing:"
# vLLM's buckets (seconds), which span CPU test models to GPU serving.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0)


class _EngineCollector:
  """Engine state at scrape time (no hook in the decode loop)."""

  def __init__(self, engine: engine_lib.ServingEngine):
    self.engine = engine

  def collect(self):
    st = self.engine.stats()
    for name, value, doc in (
        ("num_requests_running", st["live"], "Requests holding a decode slot."),
        ("num_requests_waiting", st["queued"], "Requests queued for a slot."),
        ("num_slots", st["slots"], "Decode slots (the batch of one step)."),
        ("engine_up", int(st.get("error") is None), "1 while the decode loop can serve.")):
      yield GaugeMetricFamily(PREFIX + name, doc, value=value)
    yield CounterMetricFamily(PREFIX + "decode_steps", "Batched decode steps.",
                              value=st["steps"])
    if "drafted" in st:  # a lossless method (serving/verified_engine.py)
      yield CounterMetricFamily(PREFIX + "spec_decode_num_draft_tokens",
                                "Draft tokens the teacher verified.", value=st["drafted"])
      yield CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens",
                                "Draft tokens the teacher accepted.", value=st["accepted"])


class ServingMetrics:
  """The metrics of one app; `registry` is what GET /metrics exposes."""

  def __init__(self, engine: engine_lib.ServingEngine):
    self.registry = CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    r = self.registry
    self.success = Counter(PREFIX + "request_success", "Requests that finished.",
                           ["finished_reason"], registry=r)
    self.failure = Counter(PREFIX + "request_failure", "Requests that did not finish.",
                           ["reason"], registry=r)
    self.api = Counter(PREFIX + "api_requests", "HTTP answers of the completion endpoints.",
                       ["endpoint", "status"], registry=r)
    self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens.", registry=r)
    self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.",
                                     registry=r)
    self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Submit to first block.",
                          buckets=TTFT_BUCKETS, registry=r)
    self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                          "Time per output token after the first.", buckets=TPOT_BUCKETS,
                          registry=r)
    self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submit to finish.",
                         buckets=E2E_BUCKETS, registry=r)
    for reason in ("stop", "length"):  # every series exists from the start (rates need it)
      self.success.labels(reason)
    for reason in ("cancelled", "error"):
      self.failure.labels(reason)

  def finished(self, req: engine_lib.Request, reason: str) -> None:
    """One engine request ended (any thread)."""
    now = time.perf_counter()
    self.prompt_tokens.inc(len(req.prompt_ids))
    self.generation_tokens.inc(len(req.tokens))
    if reason in ("stop", "length"):
      self.success.labels(reason).inc()
      self.e2e.observe(now - req.t_submit)
    else:
      self.failure.labels("cancelled" if reason == "cancelled" else "error").inc()
    if req.t_first is not None:
      self.ttft.observe(req.t_first - req.t_submit)
      if len(req.tokens) > 1:
        self.tpot.observe((now - req.t_first) / (len(req.tokens) - 1))

  def answered(self, endpoint: str, status: int) -> None:
    self.api.labels(endpoint, str(status)).inc()
