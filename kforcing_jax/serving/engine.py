"""Continuous batching in the style of JetStream: prefill one request, insert it into a free slot,
advance every live slot with one jitted step, free the slot when the request ends.

Shapes are fixed (slots, cache length, power-of-two prompt buckets), so one compiled step serves
any mix of requests, and requests join at block boundaries while others are mid-generation. A
PFLM slot advances k tokens per step ([previous block ; k noise] at that slot's own cache
length: `Transformer.forward_cached` with per-row starts); the AR teacher advances one.

Outputs do not depend on the batch: a request's uniforms come from `decode.row_keys(seed, [0])`
and its token i uses uniform i, exactly as offline `decode.Engine.generate([prompt], spec, seed)`
does, whatever else is running and whenever it arrives. EOS, stop strings and max_tokens are
applied on the host between steps; the frequency penalty is per slot, on the device.

The host work overlaps the device: the loop dispatches step t+1 (JAX dispatch is asynchronous)
before it copies step t's tokens to the host and runs the requests' callbacks and stop checks.
So a request that ends while step t is delivered has already been advanced by step t+1: those
tokens are dropped, and its slot takes a new request only once step t+1 has been consumed.

The decode loop runs in its own thread (`ServingEngine.start`); callers `submit` requests from
any thread and receive tokens through the request's callback.
"""

import dataclasses
import queue
import threading
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.distill import sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.observe import metrics_log
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode

log = metrics_log.log


class QueueFull(Exception):
  """More requests than slots plus the bounded queue: retry later."""


class Closed(Exception):
  """The engine is shutting down and accepts no new request."""


class Unsupported(ValueError):
  """A request setting the served stage cannot honour; `param` names the request field."""

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass
class Request:
  """One completion. `on_tokens(new_ids, finish_reason or None)` is called from the decode
  thread after every step that produced tokens for it, and once with the finish reason
  ("stop": EOS or a stop string, "length": max_tokens, "cancelled", or "error: ...")."""
  prompt_ids: list[int]
  max_tokens: int
  seed: int = 0
  frequency_penalty: float = 0.0
  # Sampling controls (distill/sampling.py): temperature 0 = greedy; top_p 1, top_k 0 and
  # min_p 0 are off. `ServingEngine.check_sampling` says what the served stage supports.
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  stop_at_eos: bool = True
  stop_check: Callable[[list[int]], bool] | None = None  # True: a stop string was produced
  on_tokens: Callable[[list[int], str | None], None] | None = None
  cancelled: bool = False
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  t_submit: float = 0.0
  t_first: float | None = None

  def cancel(self) -> None:
    """Free the slot at the next block boundary (e.g. the client disconnected)."""
    self.cancelled = True


@flax.struct.dataclass
class SlotState:
  cache_k: tuple  # per layer (slots, H, S, head_dim)
  cache_v: tuple
  len_B: jax.Array  # valid cache slots of each slot's sequence (its left padding included)
  pad_B: jax.Array
  last_BxK: jax.Array  # the block produced last: fed to the next step
  gen_B: jax.Array  # tokens generated so far = stream index of the next token
  keys_Bx2: jax.Array
  counts_BxV: jax.Array  # generated-token counts (frequency penalty)
  penalty_B: jax.Array
  # Each slot's sampling controls (per-row arrays: new settings never recompile). An AR slot
  # samples under them; a PFLM slot feeds its temperature to the noise encoder.
  controls: sampling.Controls


class ServingEngine:
  """Slot-based decoding of one stage (the AR teacher, or a PFLM at k' <= its window)."""

  # Why the decode loop stopped, if it failed: it never restarts, so the server reports it
  # (/health 503) and exits for an orchestrator to restart it.
  error: str | None = None

  def __init__(self, loaded, k: int, slots: int = 16, max_prompt_len: int = 128,
               max_tokens: int = 256, max_queue: int = 64, eos_id: int | None = None):
    self.loaded, self.cfg = loaded, loaded.model_cfg
    ar = loaded.k == 0
    if ar and k != 1:
      raise ValueError(f"the AR stage {loaded.stage!r} decodes one token per step; use k=1")
    if not ar and not 1 <= k <= loaded.k:
      raise ValueError(f"k={k} must be in 1..{loaded.k} (the trained window of {loaded.stage!r})")
    if slots < 1 or max_prompt_len < 1 or max_tokens < 1 or max_queue < 0:
      raise ValueError("slots, max_prompt_len and max_tokens must be >= 1, max_queue >= 0")
    self.k, self.slots, self.max_queue, self.eos_id = k, slots, max_queue, eos_id
    self.max_prompt_len = decode.bucket_len(max_prompt_len)
    self.max_tokens = max_tokens
    # Static decode settings; the penalty is per slot (SlotState.penalty_B), EOS is on the host.
    self.spec = decode.DecodeSpec(k=k, max_new_tokens=max_tokens, ar=ar)
    self.n_cache = self.max_prompt_len + self.spec.buffer_len + k
    self.mesh = loaded.mesh
    self._build()
    self._pending: queue.Queue = queue.Queue()
    self._live: dict[int, Request] = {}
    self._free = list(range(slots))
    # (slot, step count) of slots whose request ended while a step that advances them was in
    # flight: free once that many steps have been consumed.
    self._retiring: list[tuple[int, int]] = []
    self._consumed = 0  # steps whose tokens have been delivered
    self._lock = threading.Condition()
    self._closing = False
    self._thread: threading.Thread | None = None
    self.steps = 0  # steps dispatched
    self.state = None

  # ---- jitted programs ----

  def _build(self):
    gd, spec, cfg, k = self.loaded.graphdef, self.spec, self.cfg, self.k
    mesh = self.mesh
    merge = lambda p: model_lib.merge(gd, p)
    rep = sharding.replicated(mesh)
    self._param_sh = jax.tree.map(lambda x: x.sharding, self.loaded.params)

    def init():
      ck, cv = model_lib.init_cache(cfg, self.slots, self.n_cache)
      zi = jnp.zeros((self.slots,), jnp.int32)
      return SlotState(cache_k=ck, cache_v=cv, len_B=zi, pad_B=zi,
                       last_BxK=jnp.zeros((self.slots, k), jnp.int32), gen_B=zi,
                       keys_Bx2=jnp.zeros((self.slots, 2), jnp.uint32),
                       counts_BxV=jnp.zeros((self.slots, cfg.vocab_size), jnp.int32),
                       penalty_B=jnp.zeros((self.slots,), jnp.float32),
                       controls=sampling.Controls.rows(self.slots))

    def prefill(params, prompt_1xP, pad_1, keys_1x2, penalty_1, controls_1):
      """One request: [prompt ; k noise] (PFLM) or the prompt (AR) -> its first block and its
      cache (1, H, P, head_dim) per layer."""
      m = merge(params)
      plen = prompt_1xP.shape[1]
      ck, cv = model_lib.init_cache(cfg, 1, plen + (0 if spec.ar else k))
      logits, ck, cv = decode.block_logits(m, spec, prompt_1xP, keys_1x2, 0, ck, cv,
                                           jnp.zeros((), jnp.int32), pad_1, fresh=True,
                                           tau_B=controls_1.temperature)
      counts = jnp.zeros((1, cfg.vocab_size), jnp.int32)
      y, _, _, counts = decode.choose(spec, logits, keys_1x2, 0, jnp.zeros((1,), bool),
                                      jnp.zeros((1,), jnp.int32), counts, penalty_1, controls_1)
      return y, tuple(c[:, :, :plen] for c in ck), tuple(c[:, :, :plen] for c in cv), counts

    def insert(state, slot, y_1xK, ck, cv, counts_1xV, pad_1, keys_1x2, penalty_1, controls_1):
      put = lambda big, small: jax.lax.dynamic_update_slice(
          big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))
      plen = ck[0].shape[2]
      return state.replace(
          cache_k=tuple(put(b, s) for b, s in zip(state.cache_k, ck)),
          cache_v=tuple(put(b, s) for b, s in zip(state.cache_v, cv)),
          len_B=state.len_B.at[slot].set(plen), pad_B=put(state.pad_B, pad_1),
          last_BxK=put(state.last_BxK, y_1xK), gen_B=state.gen_B.at[slot].set(k),
          keys_Bx2=put(state.keys_Bx2, keys_1x2), counts_BxV=put(state.counts_BxV, counts_1xV),
          penalty_B=put(state.penalty_B, penalty_1),
          controls=jax.tree.map(put, state.controls, controls_1))

    def step(params, state):
      """Every slot advances one block at its own cache length (free slots compute junk)."""
      m = merge(params)
      logits, ck, cv = decode.block_logits(m, spec, state.last_BxK, state.keys_Bx2, state.gen_B,
                                           state.cache_k, state.cache_v, state.len_B,
                                           state.pad_B, tau_B=state.controls.temperature)
      b = self.slots
      y, _, _, counts = decode.choose(spec, logits, state.keys_Bx2, state.gen_B,
                                      jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
                                      state.counts_BxV, state.penalty_B, state.controls)
      # A free slot's length stays below the cache end (its writes never leave the cache).
      len_B = jnp.minimum(state.len_B + k, self.n_cache - 2 * k)
      new = state.replace(cache_k=ck, cache_v=cv, len_B=len_B, last_BxK=y,
                          gen_B=state.gen_B + k, counts_BxV=counts)
      return new, y

    self._state_sh = sharding.decode_state_shardings(
        mesh, SlotState(cache_k=(4,) * cfg.n_layers, cache_v=(4,) * cfg.n_layers, len_B=1,
                        pad_B=1, last_BxK=2, gen_B=1, keys_Bx2=2, counts_BxV=2, penalty_B=1,
                        controls=sampling.Controls(1, 1, 1, 1)))
    d2 = sharding.batch_sharding(mesh, 2)
    if self.slots % mesh.shape[sharding.DATA]:
      raise ValueError(f"slots={self.slots} must be a multiple of the mesh's data axis "
                       f"({mesh.shape[sharding.DATA]})")
    opts = decode.compiler_options(mesh.devices.flat[0].platform,
                                   self.slots * (1 if spec.ar else 2 * k),
                                   decode.weight_bytes(self.loaded.params))
    self._init = jax.jit(init, out_shardings=self._state_sh)
    self._prefill = jax.jit(prefill, in_shardings=(self._param_sh, rep, rep, rep, rep, rep),
                            out_shardings=rep)
    self._insert = jax.jit(insert, donate_argnums=0, out_shardings=self._state_sh)
    self._step = jax.jit(step, in_shardings=(self._param_sh, self._state_sh),
                         out_shardings=(self._state_sh, d2), donate_argnums=1,
                         compiler_options=opts)

  def warmup(self) -> float:
    """Compile the step and every prompt bucket's prefill and insert; returns seconds."""
    t0 = time.perf_counter()
    self.state = self._init()
    buckets, n = [], 8
    while n <= self.max_prompt_len:
      buckets.append(n)
      n *= 2
    for plen in buckets or [self.max_prompt_len]:
      self._admit_slot(0, Request(prompt_ids=[0] * plen, max_tokens=1), plen)
    self.state, y = self._step(self.loaded.params, self.state)
    jax.block_until_ready(y)
    self.state = self._init()
    return time.perf_counter() - t0

  # ---- host side ----

  def check_sampling(self, req: Request) -> None:
    """Raise Unsupported (naming the request field) for settings the served stage cannot honour:
    the AR teacher takes any temperature >= 0, top_k, top_p and min_p; a PFLM only the
    temperatures it was trained at (0 = its greedy mode, if it has one) and no filters."""
    settings = {"temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
                "min_p": req.min_p}
    for name, value in settings.items():
      try:
        sampling.check_controls(**{name: value})
      except ValueError as e:
        raise Unsupported(name, str(e)) from None
    if self.spec.ar:
      return
    temps = self.loaded.temperatures
    if not temps.allows(req.temperature):
      raise Unsupported("temperature", f"temperature {req.temperature:g} is outside what the "
                        f"{self.loaded.stage} stage was trained at: {temps}")
    on = sampling.active_filters(req.top_k, req.top_p, req.min_p)
    if on:
      raise Unsupported(on[0], f"{on[0]} is not supported by the {self.loaded.stage} stage: a "
                        "PFLM samples through its noise, at its trained temperatures only")

  def submit(self, req: Request) -> Request:
    """Queue a request (any thread). Raises QueueFull beyond slots + max_queue waiting or live
    requests, Closed while shutting down, ValueError for a prompt or max_tokens out of range,
    Unsupported (a ValueError) for sampling settings the stage cannot honour."""
    if not 1 <= len(req.prompt_ids) <= self.max_prompt_len:
      raise ValueError(f"the prompt has {len(req.prompt_ids)} tokens; this server takes 1 to "
                       f"{self.max_prompt_len}")
    if not 1 <= req.max_tokens <= self.max_tokens:
      raise ValueError(f"max_tokens must be in 1..{self.max_tokens}, got {req.max_tokens}")
    self.check_sampling(req)
    with self._lock:
      if self._closing:
        raise Closed("the server is shutting down" if self.error is None else
                     f"the decode loop failed ({self.error}); the server is restarting")
      if self._pending.qsize() + len(self._live) >= self.slots + self.max_queue:
        raise QueueFull(f"{self.slots} slots busy and {self.max_queue} requests queued")
      req.t_submit = time.perf_counter()
      self._pending.put(req)
      self._lock.notify()
    return req

  def stats(self) -> dict:
    """Counts for /health and /metrics; a retiring slot (its request is over, a step in flight
    still advances it) counts as free."""
    with self._lock:
      return {"slots": self.slots, "live": len(self._live),
              "free": len(self._free) + len(self._retiring),
              "queued": self._pending.qsize(), "steps": self.steps, "closing": self._closing,
              "error": self.error}

  def start(self) -> None:
    if self.state is None:
      self.state = self._init()
    self._thread = threading.Thread(target=self._loop, name="kforcing-decode", daemon=True)
    self._thread.start()

  def close_intake(self) -> None:
    """Refuse new requests (Closed); live and queued ones still finish."""
    with self._lock:
      self._closing = True
      self._lock.notify()

  def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
    """Stop intake; finish live and queued requests (drain) or cancel them; join the thread."""
    with self._lock:
      self._closing = True
      if not drain:
        for r in list(self._live.values()):
          r.cancel()
        while not self._pending.empty():
          self._finish(self._pending.get_nowait(), "cancelled")
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def _finish(self, req: Request, reason: str) -> None:
    req.finish_reason = reason
    if req.on_tokens is not None:
      try:
        req.on_tokens([], reason)
      except Exception:  # the request's own callback: it is over anyway; the loop goes on
        log.exception("a request's finish callback failed")

  def _admit_slot(self, slot: int, req: Request, plen: int) -> jax.Array:
    """Prefill `req` and insert it into `slot` (both dispatched, not awaited); returns its first
    block (1, k) on the device."""
    x, pad = decode.pad_prompts([req.prompt_ids], 1, plen)
    keys = decode.row_keys(req.seed, [0])
    penalty = np.asarray([req.frequency_penalty], np.float32)
    controls = jax.tree.map(lambda x: np.asarray(x)[None], sampling.Controls(
        np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p),
        np.float32(req.min_p)))
    y, ck, cv, counts = self._prefill(self.loaded.params, x, pad, keys, penalty, controls)
    self.state = self._insert(self.state, jnp.asarray(slot, jnp.int32), y, ck, cv, counts,
                              jnp.asarray(pad), jnp.asarray(keys), jnp.asarray(penalty),
                              controls)
    return y

  def _deliver(self, slot: int, req: Request, block: list[int]) -> bool:
    """Append a block to a request; True when the request is finished (its slot freed, or
    retiring until the step in flight has been consumed)."""
    if req.cancelled:
      self._release(slot, req, "cancelled")
      return True
    if req.t_first is None:
      req.t_first = time.perf_counter()
    new, reason = [], None
    for t in block:
      new.append(t)
      req.tokens.append(t)
      if req.stop_at_eos and self.eos_id is not None and t == self.eos_id:
        reason = "stop"
        break
      if len(req.tokens) >= req.max_tokens:
        reason = "length"
        break
    try:  # the request's own code (stop strings, its callback): a failure ends it alone
      if reason is None and req.stop_check is not None and req.stop_check(req.tokens):
        reason = "stop"
      if req.on_tokens is not None:
        req.on_tokens(new, None)
    except Exception as e:
      log.exception("serving one request failed")
      reason = f"error: {type(e).__name__}: {e}"
    if reason is not None:
      self._release(slot, req, reason)
      return True
    return False

  def _release(self, slot: int, req: Request, reason: str) -> None:
    with self._lock:
      if self._live.get(slot) is req:  # (never free a slot twice)
        self._live.pop(slot)
        if self.steps > self._consumed:  # a step in flight advances it: wait for its tokens
          self._retiring.append((slot, self.steps))
        else:
          self._free.append(slot)
    self._finish(req, reason)

  def _admit_waiting(self) -> list[tuple[int, Request, jax.Array]]:
    """At a block boundary: prefill each waiting request into a free slot. Returns (slot,
    request, first block on the device) of those admitted."""
    admitted = []
    while self._free and not self._pending.empty():
      req = self._pending.get_nowait()
      if req.cancelled:
        self._finish(req, "cancelled")
        continue
      with self._lock:
        slot = self._free.pop(0)
        self._live[slot] = req
      try:
        admitted.append((slot, req, self._admit_slot(slot, req,
                                                     decode.bucket_len(len(req.prompt_ids)))))
      except Exception as e:  # this request's prefill: it fails alone (a failed insert
        log.exception("prefill failed")  # loses the donated state: the step then fails)
        self._release(slot, req, f"error: {type(e).__name__}: {e}")
    return admitted

  def _consume(self, y_BxK: jax.Array, owners: dict[int, Request]) -> None:
    """Deliver one step's tokens to the requests it advanced (`owners`, as at its dispatch) that
    are still live, then free the slots that waited for this step."""
    y = np.asarray(jax.device_get(y_BxK))
    for slot, req in owners.items():
      if self._live.get(slot) is req:  # a request that ended since gets nothing more
        self._deliver(slot, req, [int(t) for t in y[slot]])
    with self._lock:
      self._consumed += 1
      self._free += [s for s, n in self._retiring if n <= self._consumed]
      self._retiring = [(s, n) for s, n in self._retiring if n > self._consumed]

  def _loop(self) -> None:
    """Admit; dispatch the next step; deliver the admitted requests' first blocks and the
    previous step's tokens while the device computes it."""
    inflight = None  # (y_BxK on the device, {slot: request} it advances) not yet delivered
    try:
      while True:
        with self._lock:
          while (not self._live and self._pending.empty() and inflight is None
                 and not self._closing):
            self._lock.wait()
          if (self._closing and not self._live and self._pending.empty()
              and inflight is None):
            return
        admitted = self._admit_waiting()
        step = None
        if self._live:
          self.state, y = self._step(self.loaded.params, self.state)
          self.steps += 1
          step = (y, dict(self._live))
        for slot, req, y_1xK in admitted:
          try:
            block = [int(t) for t in np.asarray(jax.device_get(y_1xK))[0]]
          except Exception as e:  # its prefill failed on the device
            log.exception("prefill failed")
            self._release(slot, req, f"error: {type(e).__name__}: {e}")
            continue
          self._deliver(slot, req, block)
        if inflight is not None:
          self._consume(*inflight)
        inflight = step
    except Exception as e:  # an internal error: fail every request loudly, keep the traceback
      log.exception("decode loop failed")
      with self._lock:
        self.error = f"{type(e).__name__}: {e}"
        self._closing = True
        self._free += [s for s, _ in self._retiring]
        self._retiring = []
        for slot, req in list(self._live.items()):
          self._live.pop(slot)
          self._free.append(slot)
          self._finish(req, f"error: {e}")
        while not self._pending.empty():
          self._finish(self._pending.get_nowait(), f"error: {e}")
