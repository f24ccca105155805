"""The request bodies of the OpenAI API as Pydantic models, as vLLM declares its protocol: FastAPI
validates every body against them before a handler runs, and /openapi.json publishes them.

Validation is strict (no "5" for 5, no true for 1, no NaN or infinity) and forbids unknown
fields, so a setting this server does not honour is a 400 naming it instead of being ignored.
OpenAI fields that change the output in ways the server does not implement are declared (the
schema shows them) but accept only their neutral value: the `NEUTRAL` tables below are that
whole policy. Limits that depend on the served engine (max_tokens, prompt length, token ids)
are checked by the server (serving/server.py), which also names the field.
"""

from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # as the OpenAI API
# A request's random stream is jax.random.key(seed) with 32-bit keys (x64 off): larger seeds
# would silently alias smaller ones (2**32 + 5 decodes as 5), so they are refused.
MAX_SEED = 2**32 - 1


def _unicode(text: str) -> str:
  """JSON can spell an unpaired surrogate ("\\ud800"), which Python keeps in a str but no
  tokenizer (nor UTF-8) can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise PydanticCustomError("unicode", "has an unpaired surrogate (not valid Unicode "
                              "text)") from None
  return text


Text = Annotated[str, pydantic.AfterValidator(_unicode)]
StopString = Annotated[Text, pydantic.Field(min_length=1)]
StopList = Annotated[list[StopString], pydantic.Field(max_length=MAX_STOP)]


class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
  include_usage: bool | None = pydantic.Field(
      None, description="Send a last chunk with the usage (then [DONE]).")


class _RequestBase(_Strict):
  """The fields /v1/completions and /v1/chat/completions share, with the same meaning."""

  # field -> (the values accepted, why others are refused). Values compare with ==, so 0 and
  # 0.0 are the same; strict typing has already refused true for 1.
  NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
      "n": ((None, 1), "only n=1 (send the prompt several times, with different seeds)"),
      "presence_penalty": ((None, 0), "only 0 (frequency_penalty is supported)"),
      "repetition_penalty": ((None, 1), "only 1 (frequency_penalty is supported)"),
      "logit_bias": ((None, {}), "not supported by this server"),
  }

  model: str | None = pydantic.Field(None, description="The served stage (GET /v1/models).")
  max_tokens: int | None = pydantic.Field(
      None, ge=1, description="Tokens to generate (default 16; at most the server's "
      "--max_tokens).")
  seed: int | None = pydantic.Field(
      None, ge=0, le=MAX_SEED, description="The same seed gives the same completion, whatever "
      "else the server is decoding. Default: random.")
  stop: StopString | StopList | None = pydantic.Field(
      None, description=f"Up to {MAX_STOP} strings that end the completion "
      "(not included in it).")
  stream: bool | None = pydantic.Field(None, description="Server-sent events.")
  stream_options: StreamOptions | None = None
  frequency_penalty: float | None = pydantic.Field(None, ge=-2, le=2)
  temperature: float | None = pydantic.Field(
      None, ge=0, le=2, description="0 = greedy. The served stage may support only some "
      "(a PFLM samples through its noise at the temperatures it was trained for).")
  top_p: float | None = pydantic.Field(None, gt=0, le=1)
  top_k: int | None = pydantic.Field(None, ge=-1, description="0 or -1 (vLLM's) = off.")
  min_p: float | None = pydantic.Field(None, ge=0, le=1)
  user: str | None = pydantic.Field(
      None, description="An end-user id (metadata, as OpenAI's): accepted and ignored.")
  n: int | None = None
  presence_penalty: float | None = None
  repetition_penalty: float | None = None
  logit_bias: dict[str, float] | None = None

  @pydantic.field_validator("*")
  @classmethod
  def _only_neutral(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
    rule = cls.NEUTRAL.get(info.field_name)
    if rule is not None and value not in rule[0]:
      raise PydanticCustomError("unsupported", "'{field}': {why}, got {value}",
                                {"field": info.field_name, "why": rule[1],
                                 "value": _short(value)})
    return value

  def sampling(self, vocab_size: int) -> dict:
    """The engine Request's sampling fields, defaults filled in and top_k's spellings of "off"
    (None, -1, or at least the vocabulary) made 0."""
    top_k = self.top_k or 0
    return {"temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0 if top_k < 0 or top_k >= vocab_size else top_k,
            "min_p": self.min_p or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0}

  def stops(self) -> list[str]:
    return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop


Prompt = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(_RequestBase):
  """POST /v1/completions."""

  NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
      **_RequestBase.NEUTRAL,
      "echo": ((None, False), "only false (the prompt is not echoed)"),
      "logprobs": ((None,), "not supported by this server (only null)"),
      "best_of": ((None, 1), "only 1"),
      "suffix": ((None, ""), "not supported by this server"),
  }

  prompt: Prompt = pydantic.Field(
      description="A string, a list of strings, a list of token ids, or a list of lists of "
      "token ids (one completion each). Token ids are used as given; a string gets the "
      "stage's start token first.")
  echo: bool | None = None
  logprobs: int | None = None
  best_of: int | None = None
  suffix: str | None = None

  @pydantic.field_validator("prompt")
  @classmethod
  def _non_empty(cls, value: Prompt) -> Prompt:
    if value in ("", []) or (isinstance(value, list) and any(p in ("", []) for p in value)):
      raise PydanticCustomError("empty", "'prompt' must not be empty")
    return value

  def prompts(self) -> list[str | list[int]]:
    """One entry per completion: a text or a list of token ids."""
    p = self.prompt
    return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class TextPart(_Strict):
  type: Literal["text"]
  text: Text


class ChatMessage(_Strict):
  role: Literal["system", "user", "assistant"]
  content: Text | list[TextPart] = pydantic.Field(
      description="Text, or text parts (no images, audio or files).")

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(
        part.text for part in self.content)


class ChatCompletionRequest(_RequestBase):
  """POST /v1/chat/completions."""

  NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
      **_RequestBase.NEUTRAL,
      "logprobs": ((None, False), "only false (not supported by this server)"),
      "top_logprobs": ((None, 0), "not supported by this server"),
  }

  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(
      None, ge=1, description="The newer name of max_tokens.")
  logprobs: bool | None = None
  top_logprobs: int | None = None

  @pydantic.field_validator("max_completion_tokens")
  @classmethod
  def _one_limit(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
    other = info.data.get("max_tokens")
    if value is not None and other is not None and other != value:
      raise PydanticCustomError("conflict", "'max_tokens' and 'max_completion_tokens' differ; "
                                "give one")
    return value

  def limit(self) -> tuple[int | None, str]:
    """(max tokens, the field that set it), for error messages naming what the client sent."""
    if self.max_completion_tokens is not None:
      return self.max_completion_tokens, "max_completion_tokens"
    return self.max_tokens, "max_tokens"


# ---- errors ----


class ErrorInfo(pydantic.BaseModel):
  message: str
  type: str
  param: str | None = pydantic.Field(description='The field at fault ("messages[0].role").')
  code: str | None


class ErrorResponse(pydantic.BaseModel):
  """Every 4xx/5xx answer (OpenAI's shape); /openapi.json documents it as the 4XX response."""
  error: ErrorInfo


_FIELDS = frozenset().union(*(m.model_fields for m in (
    CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)))
# What a union field takes, said once: Pydantic's own message speaks of one member only.
_UNIONS = {
    "prompt": "a non-empty string, a list of them, a list of token ids, or a list of lists of "
              "token ids",
    "stop": f"a non-empty string or a list of up to {MAX_STOP} non-empty strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": string} parts (no "
               "images, audio or files)",
}


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _walk(loc: tuple) -> tuple[str, bool]:
  """The field a validation error is about, as OpenAI writes it ("messages[0].role"), from
  Pydantic's location ("messages", 0, "role"), and whether it used all of loc. The path stops
  where Pydantic names a union member ("str", "list[int]") instead of a field, so every way of
  getting a union field wrong names the field itself."""
  parts: list[str] = []
  for x in loc:
    if isinstance(x, int) and parts:
      parts.append(f"[{x}]")
    elif isinstance(x, str) and x in _FIELDS:
      parts.append(f".{x}" if parts else x)
    else:
      return "".join(parts), False
  return "".join(parts), True


def describe(error: dict) -> tuple[str, str | None]:
  """(message, param) of one Pydantic error dict, as this server reports it (one line)."""
  kind, loc = error.get("type"), tuple(error.get("loc", ()))
  if kind == "json_invalid":
    return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
  if loc in ((), ("body",)):
    return "the request body must be a JSON object (Content-Type: application/json)", None
  body = loc[1:] if loc[:1] == ("body",) else loc
  param, whole = _walk(body)
  param = param or None
  if kind == "extra_forbidden":  # an unknown field: its own name is the param
    inner, inner_whole = _walk(body[:-1])
    if inner_whole:
      name = f"{inner}.{loc[-1]}" if inner else str(loc[-1])
      return f"'{name}' is not supported by this server", name
  if kind in ("unsupported", "empty", "conflict"):
    return str(error.get("msg")), param
  if kind == "unicode":
    return f"'{param}' {error.get('msg')}", param
  hint = _UNIONS.get((param or "").rsplit(".", 1)[-1])
  if not whole and hint:
    return f"'{param}' must be {hint}", param
  if kind == "missing":
    return f"'{param}' is required", param
  return f"'{param}': {error.get('msg')}, got {_short(error.get('input'))}", param
