"""POST /v1/chat/completions: the conversation rendered with the served stage's chat template
(the model's own, kept by an import: tokenizer_meta.json's chat_template), then decoded as one
/v1/completions prompt, with the same fields, limits and errors.

Request: model, messages ([{"role": "system"|"user"|"assistant", "content": string or
[{"type": "text", "text": ...}]}]), max_tokens (or max_completion_tokens), seed, stop, stream,
stream_options, frequency_penalty; temperature, top_p and n only at 1, presence_penalty only 0,
logprobs only false; user is accepted (an end-user id, as OpenAI's: it changes nothing). Any
other field, role or message key is a 400 naming it. A stage whose tokenizer has no chat
template answers 400 (code "no_chat_template"); a template that rejects the conversation (its
raise_exception) answers 400 with the template's message. Control tokens typed inside a
message ("<|im_start|>system") are encoded as plain text, only the template's own are
control tokens (transformers' sanitize_control_tokens=True), so no one forges a turn.

Response: OpenAI's chat format: "chat.completion" with choices[0].message {role, content}, or
streamed "chat.completion.chunk"s whose delta is {role} first, then {content} pieces, then {}
with the finish_reason (then the usage chunk when asked, then [DONE]).
"""

import asyncio
import json
import time
import uuid

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from kforcing_jax.data import hf_tokenizer
from kforcing_jax.serving import server

ROLES = ("system", "user", "assistant")
# Fields /v1/completions validates (CompletionApp.parse) and that mean the same here.
SHARED_FIELDS = ("model", "max_tokens", "seed", "stream", "stream_options", "stop",
                 "frequency_penalty", "temperature", "n")
CHAT_FIELDS = frozenset(SHARED_FIELDS) | {"messages", "max_completion_tokens", "top_p",
                                          "presence_penalty", "logprobs", "user"}


def _messages(value) -> list[dict]:
  """The conversation as plain {"role", "content": str} dicts; 400 naming any bad part."""
  if not isinstance(value, list) or not value:
    raise server.ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} "
                          "objects", "messages")
  out = []
  for i, m in enumerate(value):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise server.ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
    for key in m:
      if key not in ("role", "content"):
        raise server.ApiError(400, f"'{where}.{key}' is not supported by this server",
                              f"{where}.{key}")
    role = m.get("role")
    if role not in ROLES:
      raise server.ApiError(400, f"'{where}.role' must be one of {list(ROLES)}, got {role!r}",
                            f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
      if not all(isinstance(part, dict) and part.get("type") == "text" and
                 isinstance(part.get("text"), str) and set(part) <= {"type", "text"}
                 for part in content):
        raise server.ApiError(400, f"'{where}.content' parts must be {{\"type\": \"text\", "
                              "\"text\": string}} (no images, audio or files)",
                              f"{where}.content")
      content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
      raise server.ApiError(400, f"'{where}.content' must be a string or a list of text parts",
                            f"{where}.content")
    out.append({"role": role, "content": content})
  return out


def parse(api: "server.CompletionApp", raw: bytes) -> dict:
  """The request as CompletionApp.parse's dict (one prompt: the rendered conversation)."""
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise server.ApiError(400, f"the request body is not valid JSON: {e}") from None
  if not isinstance(body, dict):
    raise server.ApiError(400, "the request body must be a JSON object")
  for name in sorted(body):
    if name not in CHAT_FIELDS:
      raise server.ApiError(400, f"'{name}' is not supported by this server", name)
  for name, only, what in (("top_p", 1, "1 (the PFLM samples through its noise)"),
                           ("presence_penalty", 0, "0 (frequency_penalty is supported)")):
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value != only):
      raise server.ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
  if body.get("logprobs") not in (None, False):
    raise server.ApiError(400, "'logprobs' is not supported by this server", "logprobs")
  if body.get("user") is not None and not isinstance(body["user"], str):
    raise server.ApiError(400, f"'user' must be a string, got {body['user']!r}", "user")
  shared = {k: body[k] for k in SHARED_FIELDS if k in body}
  if body.get("max_completion_tokens") is not None:
    if shared.get("max_tokens") not in (None, body["max_completion_tokens"]):
      raise server.ApiError(400, "'max_tokens' and 'max_completion_tokens' differ; give one",
                            "max_completion_tokens")
    shared["max_tokens"] = body["max_completion_tokens"]
  messages = _messages(body.get("messages"))
  # The shared fields exactly as /v1/completions checks them (errors name the same fields),
  # on a stand-in prompt; the real prompt is the rendered conversation below.
  try:
    p = api.parse(json.dumps({**shared, "prompt": "x"}).encode())
  except server.ApiError as e:
    if e.param == "max_tokens" and "max_completion_tokens" in body:
      e.param, e.message = "max_completion_tokens", e.message.replace(
          "'max_tokens'", "'max_completion_tokens'")
    raise
  tok = api.tok
  if not getattr(tok, "chat_template", None):
    raise server.ApiError(400, f"the served stage {api.model_name!r} has no chat template (its "
                          "tokenizer_meta.json has none; models imported with one keep it); "
                          "use /v1/completions", "messages", "no_chat_template")
  try:
    text = tok.render_chat(messages, add_generation_prompt=True)
  except hf_tokenizer.ChatTemplateError as e:
    raise server.ApiError(400, str(e), "messages") from None
  # Control tokens typed in a message stay text: a user cannot forge another role's turn.
  try:
    ids = tok.encode_chat(messages, add_generation_prompt=True, sanitize=True)
  except hf_tokenizer.ChatTemplateError as e:
    raise server.ApiError(400, str(e), "messages") from None
  if not ids:
    raise server.ApiError(400, "the chat template rendered the conversation as no tokens",
                          "messages")
  if len(ids) > api.engine.max_prompt_len:
    raise server.ApiError(400, f"the rendered conversation has {len(ids)} tokens; this server "
                          f"takes at most {api.engine.max_prompt_len}", "messages",
                          "context_length_exceeded")
  p.update(prompts=[text], prompt_ids=[ids])
  return p


async def _watch_disconnect(http: HttpRequest, task: asyncio.Task):
  while True:
    if await http.is_disconnected():
      task.cancel()
      return
    await asyncio.sleep(0.25)


async def complete(api: "server.CompletionApp", http: HttpRequest):
  """One POST /v1/chat/completions: an SSE StreamingResponse or the whole response body."""
  api.inflight += 1
  streaming = False
  try:
    p = parse(api, await http.body())
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    ids = p["prompt_ids"][0]
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(api.run_one(0, ids, p, events))
    await asyncio.sleep(0)  # let run_one submit (and fail fast on a full queue)
    if task.done() and task.exception() is not None:
      raise task.exception()
    head = {"id": cid, "created": created, "model": api.model_name}
    usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,
                       "total_tokens": len(ids) + n}
    if p["stream"]:
      streaming = True
      return StreamingResponse(_sse(api, http, p, task, events, head, usage),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_watch_disconnect(http, task))
    try:
      await task
    finally:
      watcher.cancel()
    text, reason, n_tok = "", None, 0
    while not events.empty():
      _, delta, r, n = events.get_nowait()
      text += delta
      if r is not None:
        reason, n_tok = r, n
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason}],
            "usage": usage(n_tok)}
  finally:
    if not streaming:  # a stream's generator decrements when it has sent its last event
      api.inflight -= 1


async def _sse(api, http, p, task, events, head, usage):
  def chunk(delta, reason=None):
    event = {**head, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": reason}]}
    return f"data: {json.dumps(event)}\n\n"

  watcher = asyncio.create_task(_watch_disconnect(http, task))
  try:
    yield chunk({"role": "assistant", "content": ""})
    reason, n_tok = None, 0
    while reason is None:
      get = asyncio.create_task(events.get())
      done, _ = await asyncio.wait([get, task], return_when=asyncio.FIRST_COMPLETED)
      if get not in done:
        get.cancel()
        e = None if task.cancelled() else task.exception()
        if task.cancelled() or e is not None or events.empty():
          msg = (e.message if isinstance(e, server.ApiError) else str(e)) if e else "cancelled"
          yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
          return
        continue
      _, delta, reason, n_tok = get.result()
      if delta:
        yield chunk({"content": delta})
    yield chunk({}, reason)
    if p["include_usage"]:
      last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(n_tok)}
      yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"
  finally:
    watcher.cancel()
    task.cancel()
    api.inflight -= 1
