"""POST /v1/chat/completions: the conversation rendered with the served stage's chat template
(the model's own, kept by an import: tokenizer_meta.json's chat_template), then decoded as one
/v1/completions prompt by the same code (server.CompletionApp), with the same fields, limits
and errors.

Request (serving/protocol.py's ChatCompletionRequest): messages ([{"role": "system"|"user"|
"assistant", "content": string or [{"type": "text", "text": ...}]}]), max_tokens or
max_completion_tokens, and the fields /v1/completions shares (server.py lists them). Any other
field, role or message key is a 400 naming it. A stage whose tokenizer has no chat template
answers 400 (code "no_chat_template"); a template that rejects the conversation (its
raise_exception) answers 400 with the template's message. Control tokens typed inside a
message ("<|im_start|>system") are encoded as plain text, only the template's own are control
tokens (transformers' sanitize_control_tokens=True), so no one forges a turn.

Response: OpenAI's chat format: "chat.completion" with choices[0].message {role, content}, or
streamed "chat.completion.chunk"s whose delta is {role} first, then {content} pieces, then {}
with the finish_reason (then the usage chunk when asked, then [DONE]).
"""

from kforcing_jax.data import hf_tokenizer
from kforcing_jax.serving import protocol
from kforcing_jax.serving import server


class ChatFormat(server.CompletionFormat):
  """The chat response shapes (one choice: n is 1)."""
  id_prefix, chunk_object = "chatcmpl-", "chat.completion.chunk"

  def _chunk(self, head: dict, delta: dict, reason: str | None = None) -> dict:
    return {**head, "object": self.chunk_object,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

  def opening(self, head: dict) -> list[dict]:
    return [self._chunk(head, {"role": "assistant", "content": ""})]

  def chunks(self, head: dict, index: int, delta: str, reason: str | None) -> list[dict]:
    out = [self._chunk(head, {"content": delta})] if delta else []
    return out + ([self._chunk(head, {}, reason)] if reason is not None else [])

  def whole(self, head: dict, texts: list[str], reasons: list, usage: dict) -> dict:
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                         "logprobs": None, "finish_reason": reasons[0]}], "usage": usage}


def job(api: server.CompletionApp, body: protocol.ChatCompletionRequest) -> server.Job:
  """The conversation as one prompt: its template-rendered ids, checked as a prompt is."""
  api.check_model(body)
  n = api.max_tokens(*body.limit())
  tok = api.tok
  if not getattr(tok, "chat_template", None):
    raise server.ApiError(400, f"the served stage {api.model_name!r} has no chat template (its "
                          "tokenizer_meta.json has none; models imported with one keep it); "
                          "use /v1/completions", "messages", "no_chat_template")
  messages = [{"role": m.role, "content": m.text()} for m in body.messages]
  # Control tokens typed in a message stay text: a user cannot forge another role's turn.
  try:
    ids = tok.encode_chat(messages, add_generation_prompt=True, sanitize=True)
  except hf_tokenizer.ChatTemplateError as e:
    raise server.ApiError(400, str(e), "messages") from None
  api.check_prompt(ids, "messages", "the rendered conversation")
  return api.job(body, [ids], n)
