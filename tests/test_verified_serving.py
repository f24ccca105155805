"""The lossless methods in slots (serving/verified_engine.py) against independent offline paths:
pflm_verified's served tokens equal the AR teacher's own decode under each request's controls,
and spec_dynamic's equal offline `VerifiedEngine.generate` with the same seed, with requests
arriving mid-generation, rows advancing raggedly, the step right-sized, and no recompiling."""

import threading
import time

import pytest

from kforcing_jax.serving import decode, speculative, verified_engine
from kforcing_jax.serving import engine as engine_lib

from test_speculative import DRAFT_CFG, _stage
from test_serving_engine import RANGE_META

# Prompts of at most 8 tokens: one prompt bucket (fewer programs to compile).
PROMPTS = [[5, 9, 2], [7, 1, 1, 4, 20, 12, 8], [11, 3, 17, 0, 2], [4, 4], [9, 8, 7, 6, 5]]
# (temperature, top_k, top_p, min_p) per request: the teacher's distribution under each.
CONTROLS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (0.0, 0, 1.0, 0.0), (1.3, 4, 1.0, 0.05),
            (1.0, 0, 0.9, 0.0)]


@pytest.fixture(scope="module")
def models():
  import dataclasses
  return {"teacher": _stage("teacher", 0, seed=1),
          "k3": dataclasses.replace(_stage("k3", 3, seed=2), meta=RANGE_META),
          "draft": _stage("draft", 0, DRAFT_CFG, seed=3)}


def _teacher(loaded, prompt, n, seed, c):
  spec = decode.DecodeSpec(k=1, max_new_tokens=n, ar=True, tau=c[0], top_k=c[1], top_p=c[2],
                           min_p=c[3])
  return decode.Engine.from_stage(loaded).generate([prompt], spec, seed)[0].tokens


def _offline(teacher, drafter, method, prompt, n, seed, c):
  spec = speculative.VerifySpec(method, gamma=3, max_new_tokens=n, tau=c[0], top_k=c[1],
                                top_p=c[2], min_p=c[3])
  outs, _ = speculative.VerifiedEngine(teacher, drafter).generate([prompt], spec, seed)
  return outs[0].tokens


def _programs(eng) -> int:
  return (sum(f._cache_size() for f in eng._steps.values()) + eng._admit._cache_size()
          + eng._move._cache_size())


@pytest.mark.slow
@pytest.mark.parametrize("method,drafter", [("pflm_verified", "k3"), ("spec_dynamic", "draft")])
def test_lossless_methods_in_slots_equal_offline(models, method, drafter):
  teacher, draft = models["teacher"], models[drafter]
  eng = verified_engine.VerifiedServingEngine(
      teacher, draft, speculative.VerifySpec(method, gamma=3, max_new_tokens=1), slots=2,
      max_prompt_len=8, max_tokens=24, max_queue=8, burst=2 if method == "pflm_verified" else 1)
  assert eng.sizes == (1, 2) and eng.k == 3
  eng.warmup()
  n_programs = _programs(eng)
  specs = [(p, 9 + 3 * i, 40 + i, c) for i, (p, c) in enumerate(zip(PROMPTS, CONTROLS))]
  reqs = [engine_lib.Request(prompt_ids=p, max_tokens=n, seed=s, stop_at_eos=False,
                             temperature=c[0], top_k=c[1], top_p=c[2], min_p=c[3])
          for p, n, s, c in specs]
  left, done = [len(reqs)], threading.Event()

  def cb(new, reason):
    if reason is not None:
      left[0] -= 1
      if not left[0]:
        done.set()
  for r in reqs:
    r.on_tokens = cb
  eng.start()
  try:
    eng.submit(reqs[0])
    while eng.steps < 2:  # the rest arrive mid-generation; more than slots: some wait
      time.sleep(0.01)
    for r in reqs[1:]:
      eng.submit(r)
    assert done.wait(120)
    for r, (p, n, s, c) in zip(reqs, specs):
      assert r.finish_reason == "length" and len(r.tokens) == n
      assert r.tokens == _offline(teacher, draft, method, p, n, s, c), f"prompt {p}, {c}"
      if method == "pflm_verified":  # lossless: the AR teacher's own tokens
        assert r.tokens == _teacher(teacher, p, n, s, c), f"prompt {p}, {c}"
    st = eng.stats()
    assert 0 <= st["accepted"] <= st["drafted"] and st["drafted"] > 0
    assert st["live"] == 0 and st["free"] == 2 and st["queued"] == 0
    assert set(eng.step_sizes) == {1, 2}  # grew to 2 slots and shrank back to 1
    assert _programs(eng) == n_programs  # per-request controls never recompiled
  finally:
    eng.shutdown()


def test_lossless_serving_refuses_a_penalty_and_bad_pairings(models):
  eng = verified_engine.VerifiedServingEngine(
      models["teacher"], models["k3"], speculative.VerifySpec("pflm_verified", gamma=3,
                                                              max_new_tokens=1),
      slots=2, max_prompt_len=8, max_tokens=8)
  with pytest.raises(engine_lib.Unsupported, match="frequency_penalty") as e:
    eng.submit(engine_lib.Request(prompt_ids=[1, 2], max_tokens=4, frequency_penalty=0.5))
  assert e.value.param == "frequency_penalty"
  with pytest.raises(engine_lib.Unsupported) as e:
    eng.submit(engine_lib.Request(prompt_ids=[1, 2], max_tokens=4, top_p=0.0))
  assert e.value.param == "top_p"
  # Any valid control is served (the teacher's distribution), greedy and filters included.
  eng.check_sampling(engine_lib.Request(prompt_ids=[1], max_tokens=1, temperature=0.0, top_k=3))
  with pytest.raises(ValueError, match="k'=4"):
    verified_engine.VerifiedServingEngine(
        models["teacher"], models["k3"], speculative.VerifySpec("pflm_verified", gamma=4,
                                                                max_new_tokens=1))
  with pytest.raises(ValueError, match="needs an AR draft model"):
    verified_engine.VerifiedServingEngine(
        models["teacher"], models["k3"], speculative.VerifySpec("spec", gamma=3,
                                                                max_new_tokens=1))
