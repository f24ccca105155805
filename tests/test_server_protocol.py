"""The server's request protocol, isolation and metrics, on an app served in this process (uvicorn
on a free loopback port, so a test can break the engine underneath it): every field the server
does not honour is a 400 naming it (the table-driven Pydantic models of serving/protocol.py),
token-id prompts, a bad seed that used to kill the decode thread, one request's failure ending
only that request, a dead decode loop turning /health to 503 and the server to exit non-zero,
Prometheus /metrics moving with traffic, and a bounded fuzz of arbitrary bodies (never a 5xx)."""

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from kforcing_jax.parallel import sharding
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import server as server_lib
from kforcing_jax.training import stage_io

from test_chat_server import CONV, _make_chat_workdir
from test_serving_cli import workdir  # noqa: F401  (a module-scoped fixture: tiny work dir)

MAX_TOKENS = 8


class Live:
  """An app on 127.0.0.1:<free port>, served by uvicorn (or DrainingServer) in a thread."""

  def __init__(self, engine, tokenizer, drain_s=None):
    self.engine, self.tok = engine, tokenizer
    self.app = server_lib.make_app(engine, tokenizer, "k2")
    config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
    self.http = (uvicorn.Server(config) if drain_s is None else
                 server_lib.DrainingServer(config, engine, self.app.state.api, drain_s))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.http.started and time.time() < deadline:
      time.sleep(0.02)
    assert self.http.started

  def client(self) -> OpenAI:
    return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

  def request(self, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None
                                 else "POST", headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
        status = r.status
    except urllib.error.HTTPError as e:
      text, status = e.read().decode(), e.code
    try:
      return status, json.loads(text)
    except json.JSONDecodeError:
      return status, text

  def metrics(self) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    _, text = self.request("/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}

  def wait_idle(self, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
      _, h = self.request("/health")
      if h["live"] == 0 and h["queued"] == 0:
        return h
      time.sleep(0.05)
    raise AssertionError(f"slots still busy: {self.request('/health')}")

  def stop(self):
    self.http.should_exit = True
    self.thread.join(30)


def _engine(wd, slots=2, max_prompt_len=64):
  loaded = stage_io.load_stage(wd, "k2", mesh=sharding.make_mesh(1, 1, jax.devices()[:1]))
  eng = engine_lib.ServingEngine(loaded, 2, slots=slots, max_prompt_len=max_prompt_len,
                                 max_tokens=MAX_TOKENS, max_queue=16,
                                 eos_id=loaded.tokenizer.eos_id)
  eng.warmup()
  eng.start()
  return eng, loaded.tokenizer


@pytest.fixture(scope="module")
def chat_workdir(workdir, tmp_path_factory):  # noqa: F811
  return _make_chat_workdir(workdir, tmp_path_factory.mktemp("proto") / "w")


@pytest.fixture(scope="module")
def live(chat_workdir):
  eng, tok = _engine(chat_workdir)
  s = Live(eng, tok)
  yield s
  s.stop()
  eng.shutdown(drain=False)


def _ok(live, path="/v1/completions", **fields):
  body = {"model": "k2", "max_tokens": 2, "seed": 0, **fields}
  if path == "/v1/completions":
    body.setdefault("prompt", "behold")
  else:
    body.setdefault("messages", CONV)
  return live.request(path, body)


BOTH = ["/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("path", BOTH)
@pytest.mark.parametrize("field,value", [
    ("n", 2), ("presence_penalty", 0.5), ("repetition_penalty", 1.2), ("logit_bias", {"1": 5}),
    ("seed", 2**70), ("seed", -1), ("temperature", -0.5), ("temperature", 2.5), ("top_p", 0),
    ("top_k", -2), ("min_p", 1.5), ("frequency_penalty", 3), ("max_tokens", MAX_TOKENS + 1),
    ("stream", "yes"), ("stop", ["a"] * 5), ("user", 5), ("stream_options", {"bogus": True}),
    ("definitely_not_a_field", 1), ("tools", []), ("temperature", True)])
def test_every_unsupported_field_or_value_is_a_400_naming_it(live, path, field, value):
  status, out = _ok(live, path, **{field: value})
  param = "stream_options.bogus" if field == "stream_options" else field
  assert status == 400 and out["error"]["param"] == param, out
  assert out["error"]["type"] == "invalid_request_error" and "\n" not in out["error"]["message"]


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "echo", True), ("/v1/completions", "logprobs", 1),
    ("/v1/completions", "logprobs", 0), ("/v1/completions", "best_of", 2),
    ("/v1/completions", "suffix", "amen"), ("/v1/completions", "messages", CONV),
    ("/v1/chat/completions", "logprobs", True), ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "prompt", "x"), ("/v1/chat/completions", "echo", False),
    ("/v1/chat/completions", "max_completion_tokens", 0)])
def test_endpoint_specific_fields(live, path, field, value):
  status, out = _ok(live, path, **{field: value})
  assert status == 400 and out["error"]["param"] == field, out


def test_neutral_values_and_metadata_are_accepted(live):
  neutral = {"echo": False, "logprobs": None, "best_of": 1, "n": 1, "presence_penalty": 0,
             "logit_bias": {}, "suffix": None, "user": "someone", "repetition_penalty": 1,
             "top_k": -1, "stream_options": {"include_usage": False}}
  status, out = _ok(live, **neutral)
  assert status == 200, out
  status, out = _ok(live, "/v1/chat/completions", logprobs=False, top_logprobs=0, n=1,
                    user="someone", max_completion_tokens=2, max_tokens=2)
  assert status == 200 and out["object"] == "chat.completion", out


def test_seed_beyond_the_engine_is_a_400_and_the_server_keeps_serving(live):
  for seed in (2**70, 2**63, 2**32):
    with pytest.raises(BadRequestError) as e:
      live.client().completions.create(model="k2", prompt="behold", max_tokens=2, seed=seed)
    assert e.value.body["param"] == "seed"
  r = live.client().completions.create(model="k2", prompt="behold", max_tokens=2,
                                       seed=2**32 - 1)
  assert r.choices[0].finish_reason in ("length", "stop")
  assert live.request("/health")[1]["status"] == "ok"


def test_token_id_prompts_equal_their_string_prompts(live):
  client = live.client()
  ids = live.tok.encode_prompt("and the lord")
  by_text = client.completions.create(model="k2", prompt="and the lord", max_tokens=MAX_TOKENS,
                                      seed=5)
  by_ids = client.completions.create(model="k2", prompt=ids, max_tokens=MAX_TOKENS, seed=5)
  assert by_ids.choices[0].text == by_text.choices[0].text
  assert by_ids.usage == by_text.usage
  two = client.completions.create(model="k2", prompt=[ids, live.tok.encode_prompt("behold")],
                                  max_tokens=MAX_TOKENS, seed=5)
  assert two.choices[0].text == by_text.choices[0].text and len(two.choices) == 2
  vocab = live.engine.cfg.vocab_size
  for bad in ([vocab], [-1], [[1], []], [1, "a"], [True], "\ud800", ["a", "b\udfff"]):
    status, out = _ok(live, prompt=bad)
    assert status == 400 and out["error"]["param"] == "prompt", (bad, out)
  lone = [{"role": "user", "content": "\udb7b"}]  # (JSON may spell an unpaired surrogate)
  for messages in (lone, [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]):
    status, out = _ok(live, "/v1/chat/completions", messages=messages)
    assert status == 400 and out["error"]["param"] == "messages[0].content", out
  assert _ok(live, stop="\ud800")[0] == 400


def test_unsupported_sampling_of_the_stage_is_a_400_naming_it(live, monkeypatch):
  """The engine says what its stage can honour (`check_sampling`); the server names the field."""
  def refuse(req):
    if req.top_p < 1:
      raise engine_lib.Unsupported("top_p", "top_p is not supported by this PFLM stage")
  monkeypatch.setattr(live.engine, "check_sampling", refuse)
  for path in BOTH:
    status, out = _ok(live, path, top_p=0.5)
    assert status == 400 and out["error"]["param"] == "top_p", out
  assert _ok(live, top_p=1)[0] == 200


def test_one_failing_request_ends_alone(live, monkeypatch):
  """A bug while serving one request (here its stop-string check) ends that request with an
  error; the others and the decode loop go on, and no slot leaks."""
  api = live.app.state.api
  real = api.cut_at_stop

  def cut(text, stops):
    if "BOOM" in stops:
      raise RuntimeError("a bug in one request")
    return real(text, stops)
  monkeypatch.setattr(api, "cut_at_stop", cut)

  async def both():
    from openai import AsyncOpenAI  # pylint: disable=import-outside-toplevel
    client = AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                         timeout=30)
    out = await asyncio.gather(
        client.completions.create(model="k2", prompt="behold", max_tokens=MAX_TOKENS, seed=1,
                                  stop=["BOOM"]),
        client.completions.create(model="k2", prompt="and the", max_tokens=MAX_TOKENS, seed=2),
        return_exceptions=True)
    await client.close()
    return out

  bad, good = asyncio.run(both())
  assert getattr(bad, "status_code", None) == 500 and "a bug in one request" in str(bad), bad
  assert good.choices[0].finish_reason in ("length", "stop")
  h = live.wait_idle()
  assert h["status"] == "ok" and h["free"] == 2
  streamed = live.request("/v1/completions", {"prompt": "behold", "max_tokens": 4,
                                              "stream": True, "stop": ["BOOM"]})
  assert streamed[0] == 200 and '"error"' in streamed[1] and "[DONE]" not in streamed[1]
  assert live.wait_idle()["free"] == 2
  # A failed prefill (one request's, on the decode thread) ends that request alone too.
  inputs = live.engine._row_inputs  # pylint: disable=protected-access

  def bad_prefill(req):
    if req.seed == 4242:
      raise RuntimeError("a bad prefill")
    return inputs(req)
  monkeypatch.setattr(live.engine, "_row_inputs", bad_prefill)
  status, out = _ok(live, seed=4242)
  assert status == 500 and "a bad prefill" in out["error"]["message"], out
  assert _ok(live, seed=1)[0] == 200
  h = live.wait_idle()
  assert h["status"] == "ok" and h["free"] == 2


def test_metrics_move_with_traffic(live):
  before = live.metrics()
  r = live.client().completions.create(model="k2", prompt=["behold", "and"], max_tokens=4,
                                       seed=3)
  assert _ok(live, echo=True)[0] == 400
  after = live.metrics()
  delta = lambda name, **labels: (after.get((name, tuple(sorted(labels.items()))), 0) -
                                  before.get((name, tuple(sorted(labels.items()))), 0))
  finished = sum(delta("kforcing:request_success_total", finished_reason=x)
                 for x in ("stop", "length"))
  assert finished == 2
  assert delta("kforcing:generation_tokens_total") == r.usage.completion_tokens
  assert delta("kforcing:prompt_tokens_total") == r.usage.prompt_tokens
  assert delta("kforcing:api_requests_total", endpoint="completions", status="200") == 1
  assert delta("kforcing:api_requests_total", endpoint="completions", status="400") == 1
  for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
    assert delta(f"kforcing:{h}_count") == 2
  assert delta("kforcing:decode_steps_total") >= 1
  assert after[("kforcing:num_slots", ())] == 2 and after[("kforcing:engine_up", ())] == 1
  assert after[("kforcing:num_requests_running", ())] == 0


def test_openapi_schema_lists_the_request_fields(live):
  status, spec = live.request("/openapi.json")
  assert status == 200
  schemas = spec["components"]["schemas"]
  assert {"prompt", "seed", "temperature", "top_k", "echo"} <= set(
      schemas["CompletionRequest"]["properties"])
  assert "max_completion_tokens" in schemas["ChatCompletionRequest"]["properties"]


# ---- fuzz: no body, however odd, gets a 5xx or hurts the server ----

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) |
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_FIELDS = ["model", "max_tokens", "max_completion_tokens", "seed", "stop", "stream",
           "stream_options", "frequency_penalty", "presence_penalty", "temperature", "top_p",
           "top_k", "min_p", "n", "user", "echo", "logprobs", "top_logprobs", "best_of",
           "suffix", "logit_bias", "repetition_penalty"]
_GOOD = {"model": st.just("k2"), "seed": st.integers(0, 2**32 - 1),
         "stop": st.sampled_from(["\n", ["the", "lord"]]), "stream": st.booleans(),
         "stream_options": st.just({"include_usage": True}), "frequency_penalty": st.floats(-2, 2),
         "top_k": st.sampled_from([-1, 0, 5, 10**6]), "temperature": st.sampled_from([1, 0.5]),
         "user": st.text(max_size=5)}
_PROMPTS = st.one_of(st.sampled_from(["behold", ["and", "he"], [1, 2, 3], [[4, 5], [6]]]),
                     st.text(max_size=16), st.lists(st.integers(-2, 400), max_size=6))
_CONVS = st.one_of(
    st.sampled_from([CONV, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                    "content": st.text(max_size=16)}), max_size=3))


def _body(main_field: str, valid):
  """Anything at all (1 in 5), or a valid request (its main field valid 3 times in 4) with
  up to one known field set to an arbitrary value (1 in 2): most reach the engine and decode."""
  main = st.one_of(valid, valid, valid, _JSON)
  good = st.fixed_dictionaries({"max_tokens": st.integers(1, MAX_TOKENS)}, optional=_GOOD)
  odd = st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=1)
  request = st.builds(lambda m, g, f: {main_field: m, **g, **f}, main, good, odd)
  return st.one_of(_JSON, request, request, st.builds(lambda m, g: {main_field: m, **g},
                                                      valid, good), request)


def _post_never_5xx(live, path, body):
  raw = json.dumps(body).encode()  # NaN and Infinity as Python writes them: the server reads them
  status, out = live.request(path, raw=raw)
  assert status < 500, (body, status, out)
  if status >= 400:
    assert out["error"]["message"], out


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_body("prompt", _PROMPTS))
def test_fuzz_completions_never_5xx(live, body):
  _post_never_5xx(live, "/v1/completions", body)


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_body("messages", _CONVS))
def test_fuzz_chat_never_5xx(live, body):
  _post_never_5xx(live, "/v1/chat/completions", body)


def test_after_the_fuzz_the_server_is_healthy(live):
  h = live.wait_idle()
  assert h["status"] == "ok" and h["free"] == 2
  assert _ok(live)[0] == 200


# ---- a dead decode loop: /health 503, errors not hangs, exit non-zero ----

def test_decode_loop_failure_is_reported_and_the_server_exits(chat_workdir):
  eng, tok = _engine(chat_workdir, slots=1, max_prompt_len=8)
  live = Live(eng, tok, drain_s=5)
  try:
    assert _ok(live)[0] == 200

    def broken(params, state):
      raise RuntimeError("injected device failure")
    eng._steps = {size: broken for size in eng._steps}  # pylint: disable=protected-access
    status, out = _ok(live, max_tokens=MAX_TOKENS)
    assert status == 500 and "injected device failure" in out["error"]["message"], out
    status, h = live.request("/health")
    assert status == 503 and h["status"] == "error" and "injected" in h["reason"]
    assert h["free"] == 1 and h["live"] == 0  # no slot leaked
    status, out = _ok(live)  # later requests: an answer at once, not a hang
    assert status == 503 and out["error"]["code"] == "engine_failed", out
    assert live.metrics()[("kforcing:engine_up", ())] == 0
    live.thread.join(15)  # DrainingServer drains, then stops: serve.py exits with status 1
    assert not live.thread.is_alive() and live.http.failed
  finally:
    live.stop()
    eng.shutdown(drain=False)
