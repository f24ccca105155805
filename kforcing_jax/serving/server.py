"""The OpenAI-compatible HTTP API over a `ServingEngine` (FastAPI; run by `python -m
kforcing_jax.serve`).

  POST /v1/completions       serving/protocol.py's CompletionRequest
  POST /v1/chat/completions  messages rendered with the stage tokenizer's chat template, then
                             decoded as one /v1/completions prompt (serving/chat.py)
  GET  /v1/models            the one model served (its name is the stage, e.g. "k4")
  GET  /health               200 {"status": "ok", slots, live, free, queued, steps}; 503
                             {"status": "error", "reason"} once the decode loop has failed
  GET  /metrics              Prometheus text format (serving/metrics.py lists the names)
  GET  /openapi.json         the request schemas

Request fields honoured (both endpoints): model, max_tokens (chat also max_completion_tokens),
seed (0..2**32-1: the same seed gives the same completion whatever else is running), stop (up
to 4 strings), stream and stream_options.include_usage, frequency_penalty, and the sampling
controls temperature (0..2, 0 = greedy), top_p (0 < p <= 1), top_k (0 or -1 = off), min_p
(0..1). The served stage says which sampling settings it supports (`engine.check_sampling`: a
PFLM samples through its noise at the temperatures it was trained for); others are a 400 naming
the field. `user` is accepted and ignored (an end-user id: metadata only). /v1/completions'
prompt is a string, a list of strings, a list of token ids (used as given: a string gets the
stage's start token first) or a list of lists of token ids, one completion each.
Accepted only at their neutral value, since the server does not implement them: n and best_of
(1), echo (false), logprobs (null; chat: false), top_logprobs (0), suffix (""),
presence_penalty (0), repetition_penalty (1), logit_bias ({}). Any other field is a 400.

Every bad request gets a 4xx JSON error in the OpenAI shape {"error": {"message", "type",
"param", "code"}} with the field in `param` ("messages[0].role"), and the server keeps serving.
An unknown model is a 404; requests beyond the slots and the bounded queue get 429 with
Retry-After; while shutting down, 503. A failure while serving one request (its prefill,
tokenisation, stop check, callback) ends that request with an error and no other; if the decode
loop itself fails, /health answers 503 at once, new requests get 503, and `DrainingServer` lets
open responses finish and exits with status 1 (an orchestrator restarts it). A client that
disconnects frees its slot at the next block boundary. The decode loop runs in the engine's
thread, never on the event loop.

Metrics (GET /metrics; per app registry): kforcing:num_requests_running, num_requests_waiting,
num_slots, engine_up, decode_steps_total, request_success_total{finished_reason},
request_failure_total{reason}, api_requests_total{endpoint, status}, prompt_tokens_total,
generation_tokens_total, and the histograms time_to_first_token_seconds,
time_per_output_token_seconds, e2e_request_latency_seconds; serving a lossless method (`serve
--method`, serving/verified_engine.py) also spec_decode_num_draft_tokens_total and
spec_decode_num_accepted_tokens_total. Such a server returns the AR teacher's own samples, so it
takes any valid sampling controls and refuses frequency_penalty.
"""

import asyncio
import dataclasses
import functools
import json
import secrets
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kforcing_jax.observe import metrics_log
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import metrics as metrics_lib
from kforcing_jax.serving import protocol

log = metrics_log.log
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
DEFAULT_MAX_TOKENS = 16  # as the OpenAI API


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, err_type: str = "invalid_request_error",
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.err_type, self.headers = err_type, headers


def error_response(e: ApiError) -> JSONResponse:
  return JSONResponse({"error": {"message": e.message, "type": e.err_type, "param": e.param,
                                 "code": e.code}}, status_code=e.status, headers=e.headers)


@dataclasses.dataclass
class Job:
  """A validated request, ready for the engine: one engine request per prompt."""
  prompt_ids: list[list[int]]
  max_tokens: int
  seed: int | None
  stop: list[str]
  stream: bool
  include_usage: bool
  sampling: dict  # engine Request fields: temperature, top_p, top_k, min_p, frequency_penalty


class CompletionFormat:
  """The response shapes of /v1/completions (serving/chat.py has the chat ones)."""
  id_prefix, chunk_object = "cmpl-", "text_completion"

  def opening(self, head: dict) -> list[dict]:
    """Chunks sent before any text."""
    return []

  def chunks(self, head: dict, index: int, delta: str, reason: str | None) -> list[dict]:
    return [{**head, "object": self.chunk_object,
             "choices": [{"text": delta, "index": index, "logprobs": None,
                          "finish_reason": reason}]}]

  def whole(self, head: dict, texts: list[str], reasons: list, usage: dict) -> dict:
    return {**head, "object": "text_completion",
            "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))], "usage": usage}


class CompletionApp:
  """Validated requests to engine requests, and their tokens back as text, streamed or whole;
  shared by /v1/completions and /v1/chat/completions."""

  def __init__(self, engine: engine_lib.ServingEngine, tokenizer, model_name: str,
               metrics: metrics_lib.ServingMetrics | None = None):
    self.engine, self.tok, self.model_name = engine, tokenizer, model_name
    self.metrics = metrics
    self.inflight = 0  # completion responses not yet fully sent (graceful shutdown waits)

  # ---- validation the request models cannot do: it depends on the served engine ----

  def check_model(self,
                  body: protocol.CompletionRequest | protocol.ChatCompletionRequest) -> None:
    if body.model is not None and body.model != self.model_name:
      raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                     f"{self.model_name!r} (GET /v1/models)", "model", "model_not_found")

  def check_prompt(self, ids: list[int], param: str, what: str = "the prompt") -> list[int]:
    if not ids:
      raise ApiError(400, f"{what} has no tokens", param)
    if len(ids) > self.engine.max_prompt_len:
      raise ApiError(400, f"{what} has {len(ids)} tokens; this server takes at most "
                     f"{self.engine.max_prompt_len}", param, "context_length_exceeded")
    vocab = self.engine.cfg.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
      raise ApiError(400, f"token id {bad} is not in 0..{vocab - 1} (the model's vocabulary)",
                     param)
    return ids

  def max_tokens(self, value: int | None, param: str = "max_tokens") -> int:
    n = DEFAULT_MAX_TOKENS if value is None else value
    if n > self.engine.max_tokens:
      raise ApiError(400, f"'{param}' must be at most {self.engine.max_tokens} on this server, "
                     f"got {n}", param)
    return n

  def job(self, body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
          prompt_ids: list[list[int]], max_tokens: int) -> Job:
    return Job(prompt_ids=prompt_ids, max_tokens=max_tokens, seed=body.seed, stop=body.stops(),
               stream=bool(body.stream),
               include_usage=bool(body.stream_options and body.stream_options.include_usage),
               sampling=body.sampling(self.engine.cfg.vocab_size))

  def completion_job(self, body: protocol.CompletionRequest) -> Job:
    self.check_model(body)
    n = self.max_tokens(body.max_tokens)
    ids = [self.check_prompt(self.tok.encode_prompt(p) if isinstance(p, str) else p, "prompt")
           for p in body.prompts()]
    return self.job(body, ids, n)

  # ---- text ----

  def text_of(self, tokens: list[int]) -> str:
    return self.tok.decode([t for t in tokens if t != self.tok.eos_id])

  @staticmethod
  def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)

  @staticmethod
  def safe_prefix(text: str, stops: list[str]) -> str:
    """What can be streamed now: hold back a tail that may begin a stop string, and a partial
    UTF-8 character (decoded as U+FFFD) at the end."""
    n = len(text)
    for s in stops:
      for m in range(min(len(s) - 1, n), 0, -1):
        if text.endswith(s[:m]):
          n = min(n, len(text) - m)
          break
    out = text[:n]
    return out.rstrip("\ufffd")

  # ---- engine requests ----

  def _on_tokens(self, loop, inbox: asyncio.Queue, req: engine_lib.Request, new: list[int],
                 reason: str | None) -> None:
    """The engine's callback (decode thread): metrics, then hand over to the event loop (always:
    the response waits for it)."""
    try:
      if reason is not None and self.metrics is not None:
        self.metrics.finished(req, reason)
    finally:
      loop.call_soon_threadsafe(inbox.put_nowait, (new, reason))

  def _submit_all(self, job: Job) -> list[tuple[engine_lib.Request, asyncio.Queue]]:
    """One engine request per prompt, all checked before any is submitted; a submit that fails
    (full queue) cancels the ones already in."""
    loop = asyncio.get_running_loop()
    runs = []
    for ids in job.prompt_ids:
      seed = job.seed if job.seed is not None else secrets.randbits(31)
      req = engine_lib.Request(prompt_ids=ids, max_tokens=job.max_tokens, seed=seed,
                               **job.sampling)
      try:
        self.engine.check_sampling(req)
      except engine_lib.Unsupported as e:
        raise ApiError(400, str(e), e.param) from None
      inbox: asyncio.Queue = asyncio.Queue()
      req.on_tokens = functools.partial(self._on_tokens, loop, inbox, req)
      runs.append((req, inbox))
    done = []
    try:
      for req, _ in runs:
        self.engine.submit(req)
        done.append(req)
    except engine_lib.QueueFull as e:
      raise ApiError(429, f"server busy: {e}; retry shortly", code="rate_limit_exceeded",
                     err_type="rate_limit_error", headers={"Retry-After": "1"}) from None
    except engine_lib.Closed as e:
      failed = self.engine.error is not None
      raise ApiError(503, str(e), code="engine_failed" if failed else "shutting_down",
                     err_type="server_error", headers={"Retry-After": "5"}) from None
    except engine_lib.Unsupported as e:  # (checked above; submit checks again)
      raise ApiError(400, str(e), e.param) from None
    except ValueError as e:  # limits are checked above; the engine's own check, to be sure
      raise ApiError(400, str(e)) from None
    finally:
      if len(done) < len(runs):
        for req in done:
          req.cancel()
    return runs

  async def _run_one(self, index: int, req: engine_lib.Request, inbox: asyncio.Queue,
                     stops: list[str], events: asyncio.Queue):
    """Put (index, text delta, finish_reason or None, n_tokens) events for one request. Text
    and stop strings are handled here, on the event loop: a stop string found ends the engine
    request at its next block (`Request.stop`), so the decode thread never detokenises. A
    failure (or cancellation) is put as the event (index, exception, None, 0), then raised."""
    sent, reason, tokens = "", None, []
    try:
      while reason is None:
        new, reason = await inbox.get()
        tokens += new
        while reason is None and not inbox.empty():  # blocks that queued up meanwhile: one text
          new, reason = inbox.get_nowait()
          tokens += new
        text, hit = self.cut_at_stop(self.text_of(tokens), stops)
        if hit:
          if reason is None:
            req.stop()
          reason = "stop"
        if reason is not None and reason.startswith("error"):
          raise ApiError(500, f"decoding failed: {reason}", err_type="server_error")
        final = reason is not None
        ready = text if final else self.safe_prefix(text, stops)
        if len(ready) > len(sent) or final:
          await events.put((index, ready[len(sent):], reason, len(tokens)))
          sent = ready
    except BaseException as e:
      events.put_nowait((index, e, None, 0))
      raise
    finally:
      if reason is None:
        req.cancel()  # the client went away (the task was cancelled) or this failed: free it

  # ---- one response ----

  async def respond(self, http: HttpRequest, job: Job, fmt: CompletionFormat,
                    endpoint: str) -> Response:
    """Submit the job; an SSE StreamingResponse, or the whole response once all finished."""
    self.inflight += 1
    streaming = False
    try:
      runs = self._submit_all(job)
      events: asyncio.Queue = asyncio.Queue()
      tasks = [asyncio.create_task(self._run_one(i, req, inbox, job.stop, events))
               for i, (req, inbox) in enumerate(runs)]
      head = {"id": fmt.id_prefix + uuid.uuid4().hex[:24], "created": int(time.time()),
              "model": self.model_name}
      prompt_tokens = sum(len(x) for x in job.prompt_ids)
      usage = lambda n: {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                         "total_tokens": prompt_tokens + n}
      if job.stream:
        streaming = True
        response = StreamingResponse(self._sse(http, job, fmt, head, tasks, events, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
      else:
        response = JSONResponse(await self._whole(http, job, fmt, head, tasks, events, usage))
      if self.metrics is not None:
        self.metrics.answered(endpoint, 200)
      return response
    finally:
      if not streaming:  # a stream's generator decrements when it has sent its last event
        self.inflight -= 1

  @staticmethod
  async def _watch_disconnect(http: HttpRequest, tasks: list[asyncio.Task]):
    while True:
      if await http.is_disconnected():
        for t in tasks:
          t.cancel()
        return
      await asyncio.sleep(0.25)

  async def _sse(self, http, job, fmt, head, tasks, events, usage):
    """The streamed response's `data:` events; the last one sent ends the inflight count."""
    sse = lambda event: f"data: {json.dumps(event)}\n\n"
    watcher = asyncio.create_task(self._watch_disconnect(http, tasks))
    try:
      for event in fmt.opening(head):
        yield sse(event)
      finished, completion_tokens = 0, 0
      while finished < len(tasks):
        ready = [await events.get()]
        while not events.empty():  # what queued up meanwhile goes in one write
          ready.append(events.get_nowait())
        out = []
        for index, delta, reason, n_tok in ready:
          if isinstance(delta, BaseException):  # that completion failed or was cancelled
            msg = delta.message if isinstance(delta, ApiError) else (
                f"{type(delta).__name__}: {delta}")
            yield "".join(out) + sse({"error": {"message": msg, "type": "server_error"}})
            return
          if reason is not None:
            finished += 1
            completion_tokens += n_tok
          out += [sse(event) for event in fmt.chunks(head, index, delta, reason)]
        yield "".join(out)
      if job.include_usage:
        yield sse({**head, "object": fmt.chunk_object, "choices": [],
                   "usage": usage(completion_tokens)})
      yield "data: [DONE]\n\n"
    finally:
      watcher.cancel()
      for t in tasks:
        t.cancel()
      self.inflight -= 1

  async def _whole(self, http, job, fmt, head, tasks, events, usage) -> dict:
    """The non-streamed response: every completion's text once all have finished."""
    n = len(tasks)
    watcher = asyncio.create_task(self._watch_disconnect(http, tasks))
    try:
      await asyncio.gather(*tasks)
    except ApiError:
      raise
    except Exception as e:  # a bug serving this request: its answer, not the server's
      log.exception("completion failed")
      raise ApiError(500, f"internal error: {type(e).__name__}: {e}",
                     err_type="server_error") from None
    finally:
      watcher.cancel()
      for t in tasks:
        t.cancel()
    texts, reasons, completion_tokens = [""] * n, [None] * n, 0
    while not events.empty():
      index, delta, reason, n_tok = events.get_nowait()
      texts[index] += delta
      if reason is not None:
        reasons[index] = reason
        completion_tokens += n_tok
    return fmt.whole(head, texts, reasons, usage(completion_tokens))


def make_app(engine: engine_lib.ServingEngine, tokenizer, model_name: str) -> FastAPI:
  """The FastAPI app; the engine must be started (its thread running). `app.state.api` is the
  CompletionApp (its `inflight` count lets a graceful shutdown wait for open responses),
  `app.state.metrics` the ServingMetrics."""
  # (chat.py builds on this module, so it is imported once the module is complete)
  from kforcing_jax.serving import chat  # pylint: disable=import-outside-toplevel

  metrics = metrics_lib.ServingMetrics(engine)
  api = CompletionApp(engine, tokenizer, model_name, metrics)
  # strict_content_type=False: a body sent without a Content-Type is read as JSON, as before.
  app = FastAPI(title="kforcing_jax", docs_url=None, redoc_url=None, strict_content_type=False)
  app.state.api, app.state.metrics = api, metrics

  def answer(http: HttpRequest, e: ApiError) -> JSONResponse:
    endpoint = ENDPOINTS.get(http.url.path)
    if endpoint is not None:
      metrics.answered(endpoint, e.status)
    return error_response(e)

  @app.exception_handler(ApiError)
  async def _api_error(http: HttpRequest, e: ApiError):
    return answer(http, e)

  @app.exception_handler(RequestValidationError)
  async def _invalid(http: HttpRequest, e: RequestValidationError):
    message, param = protocol.describe(e.errors()[0])
    return answer(http, ApiError(400, message, param))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(http: HttpRequest, e: StarletteHTTPException):
    return answer(http, ApiError(e.status_code, str(e.detail),
                                 code="not_found" if e.status_code == 404 else None))

  @app.exception_handler(Exception)
  async def _bug(http: HttpRequest, e: Exception):  # logged by Starlette; the OpenAI shape here
    return answer(http, ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                 err_type="server_error"))

  @app.get("/health")
  async def health():
    st = engine.stats()
    if st["error"] is not None:
      return JSONResponse({"status": "error", "reason": st["error"], "model": model_name,
                           "k": engine.k, **st}, status_code=503)
    return {"status": "ok", "model": model_name, "k": engine.k, **st}

  @app.get("/metrics")
  async def prometheus_metrics():
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "kforcing_jax"}]}

  errors = {"4XX": {"model": protocol.ErrorResponse, "description": "Bad request (400, the "
                    "field in error.param), unknown model (404), busy (429), shutting down (503)"}}

  @app.post("/v1/completions", responses=errors)
  async def completions(body: protocol.CompletionRequest, http: HttpRequest):
    return await api.respond(http, api.completion_job(body), CompletionFormat(), "completions")

  @app.post("/v1/chat/completions", responses=errors)
  async def chat_completions(body: protocol.ChatCompletionRequest, http: HttpRequest):
    return await api.respond(http, chat.job(api, body), chat.ChatFormat(), "chat")

  return app


class DrainingServer(uvicorn.Server):
  """uvicorn.Server whose first SIGTERM / SIGINT drains: the engine refuses new requests (503),
  live ones finish and their responses are sent (up to drain_s), then the server exits with
  status 0. (uvicorn's own shutdown would end open streams at once.) A second signal exits now.
  If the decode loop fails it drains the same way and sets `failed`: the caller exits non-zero
  so that an orchestrator restarts the server."""

  def __init__(self, config: uvicorn.Config, engine: engine_lib.ServingEngine,
               api: CompletionApp, drain_s: float):
    super().__init__(config)
    self._engine, self._api, self._drain_s = engine, api, drain_s
    self.draining = False
    self.failed = False

  def handle_exit(self, sig, frame):
    if self.draining:
      self.force_exit = True
      self.should_exit = True
      return
    self._start_drain()

  async def on_tick(self, counter: int) -> bool:
    if not self.draining and self._engine.error is not None:
      log.error("the decode loop failed (%s): draining, then exiting with status 1",
                self._engine.error)
      self.failed = True
      self._start_drain()
    return await super().on_tick(counter)

  def _start_drain(self):
    self.draining = True
    threading.Thread(target=self._drain, name="drain", daemon=True).start()

  def _drain(self):
    self._engine.close_intake()
    deadline = time.monotonic() + self._drain_s
    while self._api.inflight and time.monotonic() < deadline:
      time.sleep(0.05)
    self.should_exit = True
