"""The continuous-batching engine against offline decoding: a request's tokens equal offline
`Engine.generate` with the same seed whatever arrives before, with or after it (PFLM and AR),
per-request EOS / max_tokens / frequency penalty, cancellation, the bounded queue and shutdown."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from kforcing_jax.serving import decode
from kforcing_jax.serving import engine as engine_lib

from test_speculative import _stage

PROMPTS = [[5, 9, 2], [7, 1, 1, 4, 20, 12, 8], [11, 3, 17, 0, 2], [4, 4], [9, 8, 7, 6, 5, 4, 3,
                                                                          2, 1, 19]]


# A PFLM stage trained on temperatures 0.5..1.5 with a greedy share (its meta as the trainer
# writes it): the engine serves those temperatures and refuses others.
RANGE_META = {"config": {"distill": {"tau_min": 0.5, "tau_max": 1.5, "greedy_share": 0.1}}}
# Per-request sampling controls (temperature, top_k, top_p, min_p) of the five requests.
AR_CONTROLS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (0.0, 0, 1.0, 0.0), (1.3, 4, 1.0, 0.05),
               (1.0, 0, 1.0, 0.0)]
PFLM_CONTROLS = [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (0.0, 0, 1.0, 0.0),
                 (1.4, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0)]


@pytest.fixture(scope="module")
def stages():
  k3 = _stage("k3", 3, seed=2)
  return {"teacher": _stage("teacher", 0, seed=1),
          "k3": dataclasses.replace(k3, meta=RANGE_META)}


def _offline(loaded, prompt, n, seed, k, penalty=0.0, eos=None, controls=(1.0, 0, 1.0, 0.0)):
  t, top_k, top_p, min_p = controls
  spec = decode.DecodeSpec(k=k, max_new_tokens=n, ar=loaded.k == 0, frequency_penalty=penalty,
                           eos_id=eos, tau=t, top_k=top_k, top_p=top_p, min_p=min_p)
  return decode.Engine.from_stage(loaded).generate([prompt], spec, seed)[0].tokens


def _programs(eng) -> int:
  """Compiled programs of the engine's steps, prefills and row move."""
  return (sum(f._cache_size() for f in eng._steps.values()) + eng._admit._cache_size()
          + eng._move._cache_size())


def _collect(engine, reqs):
  done = threading.Event()
  left = [len(reqs)]
  lock = threading.Lock()

  def cb(new, reason):
    if reason is not None:
      with lock:
        left[0] -= 1
        if left[0] == 0:
          done.set()
  for r in reqs:
    r.on_tokens = cb
  return done


@pytest.mark.slow
@pytest.mark.parametrize("name,k", [("k3", 3), ("k3", 2), ("teacher", 1)])
def test_requests_joining_mid_generation_equal_offline_generate(stages, name, k):
  loaded = stages[name]
  eng = engine_lib.ServingEngine(loaded, k, slots=3, max_prompt_len=16, max_tokens=20,
                                 max_queue=8)
  eng.warmup()
  eng.start()
  try:
    controls = AR_CONTROLS if loaded.k == 0 else PFLM_CONTROLS
    specs = [(p, 8 + 3 * i, 100 + i, 0.5 if i == 2 else 0.0, c)
             for i, (p, c) in enumerate(zip(PROMPTS, controls))]
    reqs = [engine_lib.Request(prompt_ids=p, max_tokens=n, seed=s, frequency_penalty=f,
                               stop_at_eos=False, temperature=c[0], top_k=c[1], top_p=c[2],
                               min_p=c[3]) for p, n, s, f, c in specs]
    n_programs = _programs(eng)
    done = _collect(eng, reqs)
    eng.submit(reqs[0])
    eng.submit(reqs[1])
    while eng.steps < 2:  # the others arrive while these two are mid-generation
      time.sleep(0.01)
    for r in reqs[2:]:  # more requests than slots: the last ones wait for a free slot
      eng.submit(r)
    assert done.wait(120)
    for r, (p, n, s, f, c) in zip(reqs, specs):
      assert r.finish_reason == "length"
      assert r.tokens == _offline(loaded, p, n, s, k, f, controls=c), f"prompt {p}, {c}"
    # Per-request settings are arrays: no request compiled a new step.
    assert _programs(eng) == n_programs
    st = eng.stats()
    assert st["live"] == 0 and st["free"] == 3 and st["queued"] == 0
  finally:
    eng.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name,k", [("k3", 3), ("teacher", 1)])
def test_right_sized_steps_grow_shrink_and_batched_prefill_keep_offline_tokens(stages, name, k):
  """A lone request runs at step size 1 (in bursts of 4 steps per dispatch); three arriving
  together are prefilled in one batch (padded to 4) and the step grows to 4; as they end it
  shrinks to 2 and 1, moving the live rows down (slot 3 -> 1 -> 0); steps attend over 32 cache
  positions, then all of them as the rows grow. Every request still decodes exactly as offline."""
  loaded = stages[name]
  # The PFLM case also right-sizes the attended cache (two lengths); the AR case has one.
  eng = engine_lib.ServingEngine(loaded, k, slots=4, max_prompt_len=16, max_tokens=40,
                                 max_queue=4, min_cache_len=32 if k > 1 else 1024)
  assert eng.sizes == (1, 2, 4) and eng.prefill_sizes == (1, 4) and eng.burst == 4
  assert eng.cache_lens == ((32, eng.n_cache) if k > 1 else (eng.n_cache,))
  eng.warmup()
  n_programs = _programs(eng)
  # A long; B, C short; D longest: D (slot 3) outlives B and C, then A.
  specs = [(PROMPTS[0], 36, 21), (PROMPTS[2], 5, 22), (PROMPTS[3], 8, 23), (PROMPTS[1], 40, 24)]
  reqs = [engine_lib.Request(prompt_ids=p, max_tokens=n, seed=s, stop_at_eos=False)
          for p, n, s in specs]
  done = _collect(eng, reqs)
  collect = reqs[0].on_tokens

  def on_a(new, reason):  # B, C, D arrive together once A has two blocks
    if len(reqs[0].tokens) >= 2 * k and not reqs[1].t_submit:
      for r in reqs[1:]:
        eng.submit(r)
    collect(new, reason)
  reqs[0].on_tokens = on_a
  eng.start()
  try:
    eng.submit(reqs[0])
    assert done.wait(120)
    for r, (p, n, s) in zip(reqs, specs):
      assert r.finish_reason == "length"
      assert r.tokens == _offline(loaded, p, n, s, k), f"prompt {p}, {n} tokens"
    assert set(eng.step_sizes) == {1, 2, 4} and eng.prefills == {1: 1, 3: 1}, (
        eng.step_sizes, eng.prefills)
    assert eng.moves == 2 and eng.bursts > 0
    # The attended cache grew with the longest live row (a prompt bucket of 8, then up to 40
    # tokens): 32 positions, then the whole cache.
    assert {c for _, _, c in eng.step_keys} == set(eng.cache_lens), eng.step_keys
    assert _programs(eng) == n_programs  # every size was compiled before serving
    st = eng.stats()
    assert st["live"] == 0 and st["free"] == 4 and st["queued"] == 0
  finally:
    eng.shutdown()


@pytest.mark.slow
def test_eos_stop_check_cancel_queue_and_shutdown(stages):
  loaded = stages["k3"]
  free = _offline(loaded, PROMPTS[1], 12, 7, 3)
  eos = free[4]
  eng = engine_lib.ServingEngine(loaded, 3, slots=2, max_prompt_len=16, max_tokens=12,
                                 max_queue=1, eos_id=eos)
  eng.warmup()
  with pytest.raises(ValueError, match="prompt has 0 tokens"):
    eng.submit(engine_lib.Request(prompt_ids=[], max_tokens=4))
  with pytest.raises(ValueError, match="max_tokens"):
    eng.submit(engine_lib.Request(prompt_ids=[1], max_tokens=13))
  # Queue bound: 2 slots + 1 waiting; the 4th is refused (the loop is not running yet).
  reqs = [engine_lib.Request(prompt_ids=PROMPTS[1], max_tokens=12, seed=7),
          engine_lib.Request(prompt_ids=PROMPTS[0], max_tokens=12, seed=1, stop_at_eos=False,
                             stop_check=lambda toks: len(toks) >= 5),
          engine_lib.Request(prompt_ids=PROMPTS[2], max_tokens=12, seed=2)]
  done = _collect(eng, reqs)
  for r in reqs:
    eng.submit(r)
  with pytest.raises(engine_lib.QueueFull):
    eng.submit(engine_lib.Request(prompt_ids=[1], max_tokens=4))
  reqs[2].cancel()  # cancelled while queued: never takes a slot
  eng.start()
  assert done.wait(60)
  want = free[:free.index(eos) + 1]
  assert reqs[0].tokens == want and reqs[0].finish_reason == "stop"
  assert reqs[1].finish_reason == "stop" and 5 <= len(reqs[1].tokens) <= 6
  assert reqs[2].finish_reason == "cancelled" and reqs[2].tokens == []
  eng.shutdown()
  with pytest.raises(engine_lib.Closed):
    eng.submit(engine_lib.Request(prompt_ids=[1], max_tokens=4))
  assert eng.stats()["free"] == 2


@pytest.mark.slow
def test_requests_ending_while_a_step_is_in_flight_get_nothing_more(stages):
  """The loop dispatches step t+1 before delivering step t, so a request that ends at step t
  was advanced once more: those tokens are dropped, and its (only) slot takes the next request
  only after that step, which still decodes exactly as offline."""
  loaded, k = stages["k3"], 3
  eng = engine_lib.ServingEngine(loaded, k, slots=1, max_prompt_len=16, max_tokens=12,
                                 max_queue=4)
  eng.warmup()
  want = [_offline(loaded, PROMPTS[i], 12, 10 + i, k) for i in range(3)]
  reqs = [engine_lib.Request(prompt_ids=PROMPTS[0], max_tokens=7, seed=10),  # 7 = 2k + 1
          engine_lib.Request(prompt_ids=PROMPTS[1], max_tokens=12, seed=11,
                             stop_check=lambda toks: len(toks) >= 5),  # fires at the 2nd block
          engine_lib.Request(prompt_ids=PROMPTS[2], max_tokens=8, seed=12)]
  calls = [[] for _ in reqs]
  done = threading.Semaphore(0)

  def record(i):
    def cb(new, reason):
      calls[i].append((list(new), reason))
      if reason is not None:
        done.release()
    return cb
  for i, r in enumerate(reqs):
    r.stop_at_eos = False
    r.on_tokens = record(i)
    eng.submit(r)
  eng.start()
  try:
    for _ in reqs:
      assert done.acquire(timeout=60)
    for i, (r, n, reason) in enumerate(zip(reqs, (7, 6, 8), ("length", "stop", "length"))):
      got = [t for new, _ in calls[i] for t in new]
      assert got == r.tokens == want[i][:n], i
      assert r.finish_reason == reason and calls[i][-1] == ([], reason)
      assert all(why is None for _, why in calls[i][:-1]), calls[i]  # nothing after its end
    # Offline needs 2 + 1 + 2 steps; each request ended with one more step in flight, whose
    # tokens were dropped and after which its slot took the next request.
    assert eng.steps == 8
    assert eng.stats()["free"] == 1
  finally:
    eng.shutdown()


def test_bad_engine_settings(stages):
  with pytest.raises(ValueError, match="trained window"):
    engine_lib.ServingEngine(stages["k3"], 4)
  with pytest.raises(ValueError, match="one token per step"):
    engine_lib.ServingEngine(stages["teacher"], 2)
  assert np.isfinite(engine_lib.ServingEngine(stages["teacher"], 1, slots=1,
                                              max_prompt_len=8, max_tokens=4).warmup())


def test_sampling_settings_a_stage_cannot_honour_are_refused(stages):
  """A PFLM decodes only at its trained temperatures (0: its greedy mode) and takes no filters;
  the AR teacher takes them all. Refusals name the request field."""
  pflm = engine_lib.ServingEngine(stages["k3"], 3, slots=1, max_prompt_len=8, max_tokens=4)
  ar = engine_lib.ServingEngine(stages["teacher"], 1, slots=1, max_prompt_len=8, max_tokens=4)
  req = lambda **kw: engine_lib.Request(prompt_ids=[1, 2], max_tokens=2, **kw)
  for kw, field in [({"temperature": 1.6}, "temperature"), ({"temperature": 0.4}, "temperature"),
                    ({"top_p": 0.9}, "top_p"), ({"top_k": 5}, "top_k"), ({"min_p": 0.1}, "min_p"),
                    ({"temperature": -1.0}, "temperature")]:
    with pytest.raises(engine_lib.Unsupported, match=field) as e:
      pflm.check_sampling(req(**kw))
    assert e.value.param == field
  for kw in ({"temperature": 0.5}, {"temperature": 1.5}, {"temperature": 0.0}, {"top_k": -1}):
    pflm.check_sampling(req(**kw))
  for kw in ({"temperature": 0.0}, {"temperature": 2.5, "top_p": 0.5, "top_k": 3, "min_p": 0.2}):
    ar.check_sampling(req(**kw))
  for kw, field in [({"top_p": 0.0}, "top_p"), ({"top_k": 1.5}, "top_k"), ({"min_p": 2.0}, "min_p")]:
    with pytest.raises(engine_lib.Unsupported, match=field):
      ar.check_sampling(req(**kw))
  # Without a greedy share, temperature 0 is refused too; the message names the trained range.
  one = engine_lib.ServingEngine(dataclasses.replace(stages["k3"], meta={}), 3, slots=1,
                                 max_prompt_len=8, max_tokens=4)
  with pytest.raises(engine_lib.Unsupported, match="trained at: 1$"):
    one.check_sampling(req(temperature=0.0))
