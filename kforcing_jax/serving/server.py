"""The OpenAI-compatible HTTP API over a `ServingEngine` (FastAPI; run by `python -m
kforcing_jax.serve`).

  POST /v1/completions  prompt (string or list of strings), max_tokens, seed, stop, stream (SSE),
                        frequency_penalty; temperature must be 1 and n 1 (the PFLM's sampling is
                        fixed by its noise), echo/logprobs/best_of are not supported.
  POST /v1/chat/completions  messages rendered with the stage tokenizer's chat template, then
                        as /v1/completions (same fields, limits, errors; n=1): serving/chat.py
  GET  /v1/models       the one model served (its name is the stage, e.g. "k4")
  GET  /health          slots, live / free slots, queue length

Every bad request gets a 4xx JSON error in the OpenAI shape {"error": {"message", "type",
"param", "code"}} and the server keeps serving. Requests beyond the slots and the bounded queue
get 429 with Retry-After; while shutting down, 503. A client that disconnects frees its slot at
the next block boundary. The decode loop runs in the engine's thread, never on the event loop.
"""

import asyncio
import json
import secrets
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kforcing_jax.serving import engine as engine_lib

MAX_STOP = 4  # as the OpenAI API


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


def _field(body: dict, name: str, types, default, check=None, what: str = ""):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
    raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
  if not isinstance(value, types):
    raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__} {value!r}", name)
  if check is not None and not check(value):
    raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
  return value


class CompletionApp:
  """Request parsing, text handling and streaming around one engine."""

  def __init__(self, engine: engine_lib.ServingEngine, tokenizer, model_name: str):
    self.engine, self.tok, self.model_name = engine, tokenizer, model_name
    self.inflight = 0  # completion responses not yet fully sent (graceful shutdown waits)

  # ---- parsing ----

  def parse(self, raw: bytes) -> dict:
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != self.model_name:
      raise ApiError(404, f"model {model!r} is not served here; this server serves "
                     f"{self.model_name!r} (GET /v1/models)", "model", "model_not_found")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, list) or not prompts or
        not all(isinstance(p, str) for p in prompts)):
      raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
    if any(not p for p in prompts):
      raise ApiError(400, "'prompt' must not be empty", "prompt")
    e = self.engine
    out = {
        "prompts": prompts,
        "max_tokens": _field(body, "max_tokens", int, 16, lambda v: 1 <= v <= e.max_tokens,
                             f"an integer in 1..{e.max_tokens}"),
        "seed": _field(body, "seed", int, None, lambda v: v >= 0, "a non-negative integer"),
        "stream": _field(body, "stream", bool, False, what="a boolean"),
        "frequency_penalty": float(_field(body, "frequency_penalty", (int, float), 0.0,
                                          lambda v: -2 <= v <= 2, "a number in [-2, 2]")),
    }
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP or
        not all(isinstance(s, str) and s for s in stops)):
      raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} "
                     "non-empty strings", "stop")
    out["stop"] = stops
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
      raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                     "stream_options")
    out["include_usage"] = bool(options.get("include_usage", False))
    temperature = _field(body, "temperature", (int, float), 1.0, what="a number")
    if temperature != 1:
      raise ApiError(400, "'temperature' must be 1: K-Forcing samples through its noise at the "
                     "temperature it was trained for", "temperature")
    if _field(body, "n", int, 1, what="an integer") != 1:
      raise ApiError(400, "'n' must be 1 (send the prompt several times, with different seeds)",
                     "n")
    for name in ("echo", "logprobs", "best_of", "suffix"):
      if body.get(name) not in (None, False, 0, 1) or (name == "best_of" and
                                                       body.get(name) not in (None, 1)):
        raise ApiError(400, f"'{name}' is not supported by this server", name)
    ids = []
    for p in prompts:
      toks = self.tok.encode_prompt(p)
      if len(toks) > e.max_prompt_len:
        raise ApiError(400, f"the prompt has {len(toks)} tokens (with the start token); this "
                       f"server takes at most {e.max_prompt_len}", "prompt",
                       "context_length_exceeded")
      ids.append(toks)
    out["prompt_ids"] = ids
    return out

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

  # ---- one completion ----

  async def run_one(self, index: int, ids: list[int], p: dict, events: asyncio.Queue):
    """Submit to the engine; put (index, text delta, finish_reason or None, n_tokens) events."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    stops = p["stop"]
    check = (lambda toks: self.cut_at_stop(self.text_of(toks), stops)[1]) if stops else None
    seed = p["seed"] if p["seed"] is not None else secrets.randbits(31)
    req = engine_lib.Request(prompt_ids=ids, max_tokens=p["max_tokens"], seed=seed,
                             frequency_penalty=p["frequency_penalty"], stop_check=check,
                             on_tokens=lambda new, reason: loop.call_soon_threadsafe(
                                 inbox.put_nowait, (new, reason)))
    try:
      self.engine.submit(req)
    except engine_lib.QueueFull as e:
      raise ApiError(429, f"server busy: {e}; retry shortly", code="rate_limit_exceeded",
                     err_type="rate_limit_error", headers={"Retry-After": "1"}) from None
    except engine_lib.Closed as e:
      raise ApiError(503, str(e), code="shutting_down", err_type="server_error",
                     headers={"Retry-After": "5"}) from None
    sent, reason = "", None
    try:
      while reason is None:
        _, reason = await inbox.get()
        text, hit = self.cut_at_stop(self.text_of(req.tokens), stops)
        if hit:  # (the engine ends the request at the same block boundary)
          reason = "stop"
        if reason is not None and reason.startswith("error"):
          raise ApiError(500, f"decoding failed: {reason}", err_type="server_error")
        final = reason is not None
        ready = text if final else self.safe_prefix(text, stops)
        if len(ready) > len(sent) or final:
          await events.put((index, ready[len(sent):], reason, len(req.tokens)))
          sent = ready
    finally:
      if reason is None:
        req.cancel()  # the client went away (the task was cancelled): free the slot

  # ---- one request ----

  def _chunk(self, cid: str, created: int, index: int, text: str, reason) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"text": text, "index": index, "logprobs": None,
                         "finish_reason": reason}]}

  async def complete(self, http: HttpRequest):
    """One POST /v1/completions: an SSE StreamingResponse, or the whole response body."""
    p = self.parse(await http.body())
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    events: asyncio.Queue = asyncio.Queue()
    prompt_tokens = sum(len(x) for x in p["prompt_ids"])
    tasks = await self._start(p, events)
    if p["stream"]:
      return StreamingResponse(self._sse(http, p, cid, created, tasks, events, prompt_tokens),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    return await self._whole(http, p, cid, created, tasks, events, prompt_tokens)

  async def _start(self, p: dict, events: asyncio.Queue) -> list[asyncio.Task]:
    """One run_one task per prompt; a submit that fails (full queue) cancels them all."""
    tasks = []
    try:
      for i, ids in enumerate(p["prompt_ids"]):
        tasks.append(asyncio.create_task(self.run_one(i, ids, p, events)))
        await asyncio.sleep(0)  # let run_one submit (and fail fast on a full queue)
        if tasks[-1].done() and tasks[-1].exception() is not None:
          raise tasks[-1].exception()
    except BaseException:
      for t in tasks:
        t.cancel()
      raise
    return tasks

  @staticmethod
  async def _watch_disconnect(http: HttpRequest, tasks: list[asyncio.Task]):
    while True:
      if await http.is_disconnected():
        for t in tasks:
          t.cancel()
        return
      await asyncio.sleep(0.25)

  async def _sse(self, http, p, cid, created, tasks, events, prompt_tokens):
    """The streamed response's `data:` events; the last one sent ends the inflight count."""
    n = len(p["prompt_ids"])
    watcher = asyncio.create_task(self._watch_disconnect(http, tasks))
    try:
      finished, completion_tokens = 0, 0
      while finished < n:
        get = asyncio.create_task(events.get())
        done, _ = await asyncio.wait([get, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        if failed and get not in done:
          get.cancel()
          e = failed[0].exception()
          msg = e.message if isinstance(e, ApiError) else str(e)
          yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
          return
        if get not in done:
          get.cancel()
          continue
        index, delta, reason, n_tok = get.result()
        if reason is not None:
          finished += 1
          completion_tokens += n_tok
        yield f"data: {json.dumps(self._chunk(cid, created, index, delta, reason))}\n\n"
      if p["include_usage"]:
        usage = {**self._chunk(cid, created, 0, "", None), "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}}
        yield f"data: {json.dumps(usage)}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      watcher.cancel()
      for t in tasks:
        t.cancel()
      self.inflight -= 1

  async def _whole(self, http, p, cid, created, tasks, events, prompt_tokens) -> dict:
    """The non-streamed response: every completion's text once all have finished."""
    n = len(p["prompt_ids"])
    watcher = asyncio.create_task(self._watch_disconnect(http, tasks))
    try:
      texts, reasons, completion_tokens = [""] * n, [None] * n, 0
      await asyncio.gather(*tasks)
      while not events.empty():
        index, delta, reason, n_tok = events.get_nowait()
        texts[index] += delta
        if reason is not None:
          reasons[index] = reason
          completion_tokens += n_tok
    finally:
      watcher.cancel()
    return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def make_app(engine: engine_lib.ServingEngine, tokenizer, model_name: str) -> FastAPI:
  """The FastAPI app; the engine must be started (its thread running). `app.state.api` is the
  CompletionApp (its `inflight` count lets a graceful shutdown wait for open responses)."""
  api = CompletionApp(engine, tokenizer, model_name)
  app = FastAPI(title="kforcing_jax", docs_url=None, redoc_url=None)
  app.state.api = api

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    return error_response(ApiError(e.status_code, str(e.detail), code="not_found"
                                   if e.status_code == 404 else None))

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "k": engine.k, **engine.stats()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "kforcing_jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    from kforcing_jax.serving import chat  # pylint: disable=import-outside-toplevel
    return await chat.complete(api, http)  # rendered with the chat template: serving/chat.py

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    api.inflight += 1
    streaming = False
    try:
      response = await api.complete(http)
      streaming = isinstance(response, StreamingResponse)
      return response
    finally:
      if not streaming:  # a stream's generator decrements when it has sent its last event
        api.inflight -= 1

  return app


class DrainingServer(uvicorn.Server):
  """uvicorn.Server whose first SIGTERM / SIGINT drains: the engine refuses new requests (503),
  live ones finish and their responses are sent (up to drain_s), then the server exits with
  status 0. (uvicorn's own shutdown would end open streams at once.) A second signal exits now."""

  def __init__(self, config: uvicorn.Config, engine: engine_lib.ServingEngine,
               api: CompletionApp, drain_s: float):
    super().__init__(config)
    self._engine, self._api, self._drain_s = engine, api, drain_s
    self.draining = False

  def handle_exit(self, sig, frame):
    if self.draining:
      self.force_exit = True
      self.should_exit = True
      return
    self.draining = True
    threading.Thread(target=self._drain, name="drain", daemon=True).start()

  def _drain(self):
    self._engine.close_intake()
    deadline = time.monotonic() + self._drain_s
    while self._api.inflight and time.monotonic() < deadline:
      time.sleep(0.05)
    self.should_exit = True


