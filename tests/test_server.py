"""The OpenAI-compatible server, live on a free loopback port, driven by the official `openai`
client: completions (equal to offline `generate` with the same seed), streaming, stop strings,
bad requests (4xx JSON errors, and the server keeps serving), client disconnects freeing their
slot, a soak of concurrent requests with nothing lost, 429 beyond the queue, and SIGTERM."""

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from openai import APIStatusError, AsyncOpenAI, OpenAI

from kforcing_jax.training import stage_io
from kforcing_jax.serving import decode

from test_serving_cli import workdir  # noqa: F401  (a module-scoped fixture: tiny work dir)

# Slow tier (-m 'not slow' skips it): its fixture trains a model; soak and drain runs.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
  def __init__(self, workdir, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "kforcing_jax.serve", f"--workdir={workdir}", "--port=0",
         "--max_prompt_len=32", "--max_tokens=32", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    self.url = None
    while time.time() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        break
      m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
      if m:
        self.url = m.group(1)
        self.startup_line = line
        break
    if self.url is None:
      self.stop()
      raise AssertionError("server did not start: " + self.proc.stderr.read()[-3000:])
    self.port = int(self.url.rsplit(":", 1)[1])

  def client(self):
    return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

  def get(self, path):
    with urllib.request.urlopen(self.url + path, timeout=10) as r:
      return json.load(r)

  def post_raw(self, body: bytes, path="/v1/completions"):
    req = urllib.request.Request(self.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.load(r), dict(r.headers)
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read()), dict(e.headers)

  def wait_idle(self, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
      h = self.get("/health")
      if h["live"] == 0 and h["queued"] == 0:
        return h
      time.sleep(0.1)
    raise AssertionError(f"slots still busy: {self.get('/health')}")

  def stop(self):
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()


@pytest.fixture(scope="module")
def server(workdir):  # noqa: F811
  s = Server(workdir, "--stage=k2", "--k=2", "--slots=4", "--max_queue=400")
  yield s
  s.stop()


def _offline_text(workdir, prompt, n, seed, stage="k2", tau=1.0):  # noqa: F811
  loaded = stage_io.load_stage(workdir, stage)
  tok = loaded.tokenizer
  spec = decode.DecodeSpec(k=loaded.k or 1, max_new_tokens=n, ar=loaded.k == 0,
                           eos_id=tok.eos_id, tau=tau)
  ids = decode.Engine.from_stage(loaded).generate([tok.encode_prompt(prompt)], spec,
                                                  seed)[0].tokens
  return tok.decode([t for t in ids if t != tok.eos_id])


def test_startup_models_health(server):
  assert "serving k2 (k=2)" in server.startup_line and "4 slots" in server.startup_line
  assert "compiled in" in server.startup_line
  assert [m.id for m in server.client().models.list().data] == ["k2"]
  h = server.get("/health")
  assert h["status"] == "ok" and h["slots"] == 4 and h["free"] == 4 and h["k"] == 2


def test_completion_equals_offline_generate_and_streams(server, workdir):  # noqa: F811
  client = server.client()
  r = client.completions.create(model="k2", prompt="and the lord", max_tokens=12, seed=5)
  assert r.choices[0].text == _offline_text(workdir, "and the lord", 12, 5)
  assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens >= 2
  # A list of prompts: one choice each, in order.
  r2 = client.completions.create(model="k2", prompt=["and the lord", "behold"], max_tokens=12,
                                 seed=5)
  assert [c.index for c in r2.choices] == [0, 1]
  assert r2.choices[0].text == r.choices[0].text
  # Streaming: the deltas add up to the same text; the last choice chunk has the reason.
  chunks = list(client.completions.create(model="k2", prompt="and the lord", max_tokens=12,
                                          seed=5, stream=True,
                                          stream_options={"include_usage": True}))
  text = "".join(c.choices[0].text for c in chunks if c.choices)
  assert text == r.choices[0].text
  reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert reasons[-1] in ("length", "stop") and all(x is None for x in reasons[:-1])
  assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_strings(server):
  client = server.client()
  full = client.completions.create(model="k2", prompt="he shall", max_tokens=24, seed=9)
  text = full.choices[0].text
  assert len(text) >= 8, text
  stop = text[4:7]
  cut = text[:text.find(stop)]
  r = client.completions.create(model="k2", prompt="he shall", max_tokens=24, seed=9,
                                stop=[stop, "never-produced-xyz"])
  assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model="k2", prompt="he shall", max_tokens=24, seed=9, stop=stop, stream=True))
  assert streamed == cut


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "k2", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "k2", "prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"model": "k2", "prompt": []}).encode(), 400, "prompt"),
    (json.dumps({"model": "k2", "prompt": "the " * 200}).encode(), 400, "prompt"),
    (json.dumps({"model": "k2", "prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "k2", "prompt": "a", "max_tokens": 33}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "k2", "prompt": "a", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "k2", "prompt": "a", "seed": -1}).encode(), 400, "seed"),
    (json.dumps({"model": "k2", "prompt": "a", "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"model": "k2", "prompt": "a", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "k2", "prompt": "a", "temperature": 0.5}).encode(), 400,
     "temperature"),
    (json.dumps({"model": "k2", "prompt": "a", "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": "k7", "prompt": "a"}).encode(), 404, "model"),
])
def test_bad_requests_get_4xx_json_errors(server, body, status, param):
  code, payload, _ = server.post_raw(body)
  assert code == status, payload
  err = payload["error"]
  assert err["message"] and err["type"] and err["param"] == param
  # ... and the server keeps serving.
  ok = server.client().completions.create(model="k2", prompt="behold", max_tokens=2, seed=0)
  assert ok.choices[0].finish_reason in ("length", "stop")


def test_unknown_route_and_openai_client_error(server):
  with pytest.raises(urllib.error.HTTPError) as e:
    server.get("/v2/nothing")
  assert e.value.code == 404 and "error" in json.loads(e.value.read())
  with pytest.raises(APIStatusError) as e:
    server.client().completions.create(model="k2", prompt="a", max_tokens=1000)
  assert e.value.status_code == 400


def test_disconnect_mid_stream_frees_the_slot(server):
  server.wait_idle()
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
  body = json.dumps({"model": "k2", "prompt": "and the lord", "max_tokens": 32, "seed": 1,
                     "stream": True})
  conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  resp = conn.getresponse()
  assert resp.status == 200
  resp.fp.readline()  # the first event arrived: the request holds a slot
  conn.sock.close()
  conn.close()
  h = server.wait_idle()
  assert h["free"] == 4


def test_soak_of_concurrent_requests_loses_nothing(server):
  async def soak(n):
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)

    async def one(i):
      r = await client.completions.create(model="k2", prompt=["and", "behold", "he"][i % 3],
                                          max_tokens=4, seed=i)
      return r.choices[0].finish_reason

    out = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    await client.close()
    return out

  results = asyncio.run(soak(240))
  errors = [r for r in results if isinstance(r, BaseException)]
  assert not errors, errors[:3]
  assert all(r in ("length", "stop") for r in results)
  h = server.wait_idle()
  assert h["free"] == 4 and h["queued"] == 0


def test_queue_limit_429_then_sigterm_drains_and_exits(workdir):  # noqa: F811
  s = Server(workdir, "--stage=teacher", "--slots=1", "--max_queue=0", "--drain_s=60")
  try:
    async def burst():
      client = AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
      calls = [client.completions.create(model="teacher", prompt="and", max_tokens=32, seed=i)
               for i in range(4)]
      out = await asyncio.gather(*calls, return_exceptions=True)
      await client.close()
      return out

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, APIStatusError)]
    assert refused and all(r.status_code == 429 for r in refused)
    assert refused[0].response.headers.get("retry-after")
    assert any(not isinstance(r, BaseException) for r in results)
    # SIGTERM with a request in flight: it completes, then the process exits cleanly.
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
    body = json.dumps({"model": "teacher", "prompt": "and", "max_tokens": 32, "seed": 3,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    data = sock.recv(65536)  # the headers and the first event: the request is in flight
    s.proc.send_signal(signal.SIGTERM)
    while chunk := sock.recv(65536):
      data += chunk
    sock.close()
    text = data.decode()
    # It ends normally: max_tokens, or EOS. (Which one depends on the fixture's BPE, and the
    # tokenizers library's BPE trainer breaks ties differently from one process to the next.)
    assert "[DONE]" in text and ('"finish_reason": "length"' in text or
                                 '"finish_reason": "stop"' in text)
    assert s.proc.wait(timeout=60) == 0
  finally:
    s.stop()


def test_a_lossless_method_served_returns_the_teachers_tokens(workdir):  # noqa: F811
  """serve --method=pflm_verified: the k2 stage drafts, the teacher verifies; a completion is
  the AR teacher's own offline decode with that seed, greedy too; its drafts show in /metrics;
  a frequency penalty (which would change the teacher's distribution) is a 400."""
  s = Server(workdir, "--method=pflm_verified", "--slots=2", "--burst=1", "--max_prompt_len=8")
  try:
    assert "serving pflm_verified:k2 (k=2)" in s.startup_line
    client = s.client()
    for seed, temperature in ((5, 1.0), (6, 0.0)):
      r = client.completions.create(model="pflm_verified:k2", prompt="and the lord",
                                    max_tokens=10, seed=seed, temperature=temperature)
      want = _offline_text(workdir, "and the lord", 10, seed, stage="teacher",
                           tau=temperature)
      assert r.choices[0].text == want, (seed, temperature)
    metrics = urllib.request.urlopen(s.url + "/metrics", timeout=10).read().decode()
    drafted = re.search(r"^kforcing:spec_decode_num_draft_tokens_total (\S+)$", metrics, re.M)
    accepted = re.search(r"^kforcing:spec_decode_num_accepted_tokens_total (\S+)$", metrics,
                         re.M)
    assert float(drafted.group(1)) > 0 and 0 <= float(accepted.group(1)) <= float(
        drafted.group(1))
    status, body, _ = s.post_raw(json.dumps({"prompt": "and", "max_tokens": 4,
                                             "frequency_penalty": 0.5}).encode())
    assert status == 400 and body["error"]["param"] == "frequency_penalty"
    assert s.get("/health")["status"] == "ok"
  finally:
    s.stop()
