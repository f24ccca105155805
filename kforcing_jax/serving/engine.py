"""Continuous batching in the style of JetStream: prefill the waiting requests in one batch,
insert them into free slots, advance the live slots with one jitted step, free a slot when its
request ends.

Shapes are fixed (slots, cache length, power-of-two prompt buckets, a few compiled batch
sizes), so a handful of programs compiled before serving cover any mix of requests, and requests
join at block boundaries while others are mid-generation. A PFLM slot advances k tokens per step
([previous block ; k noise] at that slot's own cache length: `Transformer.forward_cached` with
per-row starts); the AR teacher advances one.

Right-sized steps: a step computes only slots [0, size), size the smallest of `step_sizes` (1,
2, 4, ... slots) holding the live requests, so a lone request runs at the batch-1 step's speed.
New requests take the lowest free slot, and when the size shrinks the live rows above it move
into free slots below it (`_compact`, one row copy each). Batched prefill: at a block boundary
the oldest waiting request and the next ones of its prompt bucket (as many as free slots) are
prefilled in one call of the next compiled size and scattered into their slots; one prefill per
boundary, so live slots never wait for more than one. While no request waits and every live one
has `burst` blocks left, one dispatch runs `burst` steps (a scan) and delivers them together.

Right-sized cache: a step attends over (and writes) only the first cache_len positions of the
KV cache, the shortest compiled length (`min_cache_len` doubling, then the whole cache) that
holds every live row through the dispatch, so short requests do not pay for the longest prompt
plus max_tokens.

Outputs do not depend on the batch: a request's uniforms come from `decode.row_keys(seed, [0])`
(derived inside the jitted prefill: `decode.seed_keys`) and its token i uses uniform i, exactly
as offline `decode.Engine.generate([prompt], spec, seed)` does, whatever else is running,
whenever it arrives, whichever slot, step size, cache length or prefill batch serves it (rows
never mix). EOS, stop strings and max_tokens are applied on the host between
steps; the frequency penalty is per slot, on the device.

The host work overlaps the device: the loop dispatches step t+1 (JAX dispatch is asynchronous)
before it copies step t's tokens to the host and runs the requests' callbacks and stop checks.
A request that ends while step t is delivered has already been advanced by step t+1: its slot is
free at once, and step t+1's tokens go by request (not slot) to those still live, so it gets
nothing more.

The decode loop runs in its own thread (`ServingEngine.start`); callers `submit` requests from
any thread and receive tokens through the request's callback.
"""

import bisect
import collections
import dataclasses
import functools
import threading
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kforcing_jax.distill import sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.observe import metrics_log
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode

log = metrics_log.log


def step_sizes(slots: int, multiple: int = 1) -> tuple[int, ...]:
  """The compiled batch sizes of steps and prefills: `multiple` (the mesh's data axis) times
  powers of two below `slots`, then `slots`."""
  sizes, n = [], multiple
  while n < slots:
    sizes.append(n)
    n *= 2
  return tuple(sizes) + (slots,)


def check_ranges(req: "Request") -> None:
  """Raise Unsupported naming the first sampling setting out of its valid range."""
  settings = {"temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
              "min_p": req.min_p}
  for name, value in settings.items():
    try:
      sampling.check_controls(**{name: value})
    except ValueError as e:
      raise Unsupported(name, str(e)) from None


def sized_step(advance: Callable, slots: int, state, size: int, n: int,
               cache_len: int | None = None):
  """Slots [0, size) of `state` advance n times by `advance(part) -> (part, out)` (free slots
  among them compute junk); slots >= size are untouched. `cache_len`: the KV caches (the rank-4
  arrays, as in sharding.decode_state_shardings) are seen and written over their first cache_len
  positions only. Returns (state, outs stacked (n, ...))."""
  def view(x):
    if x.ndim == 4 and cache_len is not None:
      return x[:size, :, :cache_len]
    return x if size == slots else x[:size]
  part = jax.tree.map(view, state)
  if n == 1:
    new, y = advance(part)
    y = jax.tree.map(lambda a: a[None], y)
  else:
    new, y = jax.lax.scan(lambda p, _: advance(p), part, None, length=n)
  new = jax.tree.map(lambda full, p: p if p.shape == full.shape else jax.lax.dynamic_update_slice(
      full, p, (0,) * full.ndim), state, new)
  return new, y


def cache_lens(n_cache: int, minimum: int) -> tuple[int, ...]:
  """The attended cache lengths compiled: `minimum` doubling below n_cache, then n_cache."""
  out, c = [], max(1, minimum)
  while c < n_cache:
    out.append(c)
    c *= 2
  return tuple(out) + (n_cache,)


def move_row(state, src, dst):
  """Slot src's row copied to slot dst (compaction)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_update_slice_in_dim(
      x, jax.lax.dynamic_slice_in_dim(x, src, 1, 0), dst, 0), state)


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
  stopped: bool = False
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  t_submit: float = 0.0
  t_first: float | None = None
  slot: int = -1  # the engine's slot holding it while live (rows move when the step shrinks)
  planned: int = 0  # tokens dispatched for it (delivered or in flight)

  def cancel(self) -> None:
    """Free the slot at the next block boundary (e.g. the client disconnected)."""
    self.cancelled = True

  def stop(self) -> None:
    """End with finish reason "stop" at the next block boundary, delivering nothing more: the
    caller found a stop string itself (the server detokenises off the decode thread)."""
    self.stopped = True


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
  """Slot-based decoding of one stage (the AR teacher, or a PFLM at k' <= its window); the
  lossless methods subclass it (serving/verified_engine.py)."""

  # Why the decode loop stopped, if it failed: it never restarts, so the server reports it
  # (/health 503) and exits for an orchestrator to restart it.
  error: str | None = None

  def __init__(self, loaded, k: int, slots: int = 16, max_prompt_len: int = 128,
               max_tokens: int = 256, max_queue: int = 64, eos_id: int | None = None,
               burst: int = 4, min_cache_len: int = 128):
    self.loaded, self.cfg = loaded, loaded.model_cfg
    ar = loaded.k == 0
    if ar and k != 1:
      raise ValueError(f"the AR stage {loaded.stage!r} decodes one token per step; use k=1")
    if not ar and not 1 <= k <= loaded.k:
      raise ValueError(f"k={k} must be in 1..{loaded.k} (the trained window of {loaded.stage!r})")
    if slots < 1 or max_prompt_len < 1 or max_tokens < 1 or max_queue < 0 or burst < 1:
      raise ValueError("slots, max_prompt_len, max_tokens and burst must be >= 1, max_queue >= 0")
    # Static decode settings; the penalty is per slot (SlotState.penalty_B), EOS is on the host.
    self.spec = decode.DecodeSpec(k=k, max_new_tokens=max_tokens, ar=ar)
    self.n_cache = decode.bucket_len(max_prompt_len) + self.spec.buffer_len + k
    self.cache_lens = cache_lens(self.n_cache, min_cache_len)
    self._setup(k, slots, max_prompt_len, max_tokens, max_queue, eos_id, burst)

  def _setup(self, k, slots, max_prompt_len, max_tokens, max_queue, eos_id, burst,
             params=None, prefill_tokens=None, step_tokens=None):
    """What every engine has: the programs (`_build`) and the host's slot bookkeeping.
    `params`: the pytree the programs take (default the stage's); `prefill_tokens` /
    `step_tokens`: tokens a prefill produces / a step produces at least (default k)."""
    self.k, self.slots, self.max_queue, self.eos_id = k, slots, max_queue, eos_id
    # Steps per dispatch while no request waits and every live one has that many blocks left:
    # one dispatch and one delivery per `burst` steps (the offline decoder's loop, on the host).
    self.burst = burst
    self.max_prompt_len = decode.bucket_len(max_prompt_len)
    self.max_tokens = max_tokens
    self.mesh = self.loaded.mesh
    self._params = self.loaded.params if params is None else params
    self._prefill_tokens = k if prefill_tokens is None else prefill_tokens
    self._step_tokens = k if step_tokens is None else step_tokens
    data = self.mesh.shape[sharding.DATA]
    if slots % data:
      raise ValueError(f"slots={slots} must be a multiple of the mesh's data axis ({data})")
    self.sizes = step_sizes(slots, data)
    # Prefill batches: every other step size (1, 4, 16 of 16 slots) and the slots, since every
    # prompt bucket compiles each of them.
    self.prefill_sizes = tuple(sorted(set(self.sizes[::2]) | {slots}))
    self._build()
    self._pending: collections.deque[Request] = collections.deque()
    self._live: dict[int, Request] = {}  # slot -> request
    self._free = list(range(slots))  # sorted: a new request takes the lowest
    self._lock = threading.Condition()
    self._closing = False
    self._thread: threading.Thread | None = None
    self.steps = 0  # steps dispatched
    self.step_sizes = collections.Counter()  # steps dispatched per size
    self.step_keys = collections.Counter()  # steps dispatched per program (_step_key)
    self.prefills = collections.Counter()  # batched prefills per number of requests
    self.moves = 0  # rows moved by compaction
    self.bursts = 0  # dispatches of `burst` steps
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

    def admit(params, state, prompt_BxP, pad_B, seeds_B, penalty_B, controls, slot_B):
      """Prefill a batch of requests of one prompt bucket ([prompt ; k noise] for a PFLM, the
      prompt for AR) and insert row b into slot slot_B[b] (>= slots: a padding row, dropped).
      Row b's uniforms are row 0 of seed seeds_B[b]'s stream. Returns (state, first blocks (B,
      k))."""
      m = merge(params)
      keys_Bx2 = decode.seed_keys(seeds_B)
      b, plen = prompt_BxP.shape
      ck, cv = model_lib.init_cache(cfg, b, plen + (0 if spec.ar else k))
      logits, ck, cv = decode.block_logits(m, spec, prompt_BxP, keys_Bx2, 0, ck, cv,
                                           jnp.zeros((), jnp.int32), pad_B, fresh=True,
                                           tau_B=controls.temperature)
      counts = jnp.zeros((b, cfg.vocab_size), jnp.int32)
      y, _, _, counts = decode.choose(spec, logits, keys_Bx2, 0, jnp.zeros((b,), bool),
                                      jnp.zeros((b,), jnp.int32), counts, penalty_B, controls)
      put = lambda big, small: big.at[slot_B].set(small.astype(big.dtype), mode="drop")
      put_cache = lambda big, small: big.at[slot_B, :, :plen].set(
          small[:, :, :plen].astype(big.dtype), mode="drop")
      new = state.replace(
          cache_k=tuple(put_cache(c, n) for c, n in zip(state.cache_k, ck)),
          cache_v=tuple(put_cache(c, n) for c, n in zip(state.cache_v, cv)),
          len_B=put(state.len_B, jnp.full((b,), plen)), pad_B=put(state.pad_B, pad_B),
          last_BxK=put(state.last_BxK, y), gen_B=put(state.gen_B, jnp.full((b,), k)),
          keys_Bx2=put(state.keys_Bx2, keys_Bx2), counts_BxV=put(state.counts_BxV, counts),
          penalty_B=put(state.penalty_B, penalty_B),
          controls=jax.tree.map(put, state.controls, controls))
      return new, y

    def advance(m, part):
      """Every row of `part` advances one block at its own cache length."""
      size = part.len_B.shape[0]
      # One row: a scalar cache start (a plain slice write; per-row starts' batched write cost
      # ~1 ms more at size 1 on CPU, copying the cache).
      start = part.len_B[0] if size == 1 else part.len_B
      logits, ck, cv = decode.block_logits(m, spec, part.last_BxK, part.keys_Bx2, part.gen_B,
                                           part.cache_k, part.cache_v, start, part.pad_B,
                                           tau_B=part.controls.temperature)
      y, _, _, counts = decode.choose(spec, logits, part.keys_Bx2, part.gen_B,
                                      jnp.zeros((size,), bool), jnp.zeros((size,), jnp.int32),
                                      part.counts_BxV, part.penalty_B, part.controls)
      # A free slot's length stays below the cache end (its writes never leave the cache).
      len_B = jnp.minimum(part.len_B + k, part.cache_k[0].shape[2] - 2 * k)
      return part.replace(cache_k=ck, cache_v=cv, len_B=len_B, last_BxK=y,
                          gen_B=part.gen_B + k, counts_BxV=counts), y

    def step(params, state, size, n, cache_len):
      m = merge(params)
      return sized_step(lambda part: advance(m, part), self.slots, state, size, n, cache_len)

    self._state_sh = sharding.decode_state_shardings(
        mesh, SlotState(cache_k=(4,) * cfg.n_layers, cache_v=(4,) * cfg.n_layers, len_B=1,
                        pad_B=1, last_BxK=2, gen_B=1, keys_Bx2=2, counts_BxV=2, penalty_B=1,
                        controls=sampling.Controls(1, 1, 1, 1)))
    blocks_sh = NamedSharding(mesh, P(None, sharding.DATA, None))
    platform, wbytes = mesh.devices.flat[0].platform, decode.weight_bytes(self.loaded.params)
    self._init = jax.jit(init, out_shardings=self._state_sh)
    self._admit = jax.jit(admit, in_shardings=(self._param_sh, self._state_sh) + (rep,) * 6,
                          out_shardings=(self._state_sh, rep), donate_argnums=1)
    self._move = jax.jit(move_row, out_shardings=self._state_sh, donate_argnums=0)
    self._steps = {
        (size, n, c): jax.jit(functools.partial(step, size=size, n=n, cache_len=c),
                              in_shardings=(self._param_sh, self._state_sh),
                              out_shardings=(self._state_sh, blocks_sh), donate_argnums=1,
                              compiler_options=decode.compiler_options(
                                  platform, size * (1 if spec.ar else 2 * k), wbytes))
        for size in self.sizes for n in sorted({1, self.burst}) for c in self.cache_lens}

  def warmup(self) -> float:
    """Compile every step size, the row move, and the batched prefill of every (batch size,
    prompt bucket); returns seconds."""
    t0 = time.perf_counter()
    self.state = self._init()
    plen = 8
    while True:
      for size in self.prefill_sizes:
        reqs = [Request(prompt_ids=[0] * plen, max_tokens=1)] * size
        self.state, _ = self._admit_batch(reqs, list(range(size)), plen)
      if plen >= self.max_prompt_len:
        break
      plen *= 2
    self.state = self._move(self.state, np.int32(self.slots - 1), np.int32(0))
    for key in self._steps:
      self.state, y = self._steps[key](self._params, self.state)
    jax.block_until_ready(y)
    self.state = self._init()
    return time.perf_counter() - t0

  # ---- host side ----

  def check_sampling(self, req: Request) -> None:
    """Raise Unsupported (naming the request field) for settings the served stage cannot honour:
    the AR teacher takes any temperature >= 0, top_k, top_p and min_p; a PFLM only the
    temperatures it was trained at (0 = its greedy mode, if it has one) and no filters."""
    check_ranges(req)
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
    requests, Closed while shutting down, ValueError for a prompt, max_tokens or seed (uint32)
    out of range, Unsupported (a ValueError) for sampling settings the stage cannot honour."""
    if not 1 <= len(req.prompt_ids) <= self.max_prompt_len:
      raise ValueError(f"the prompt has {len(req.prompt_ids)} tokens; this server takes 1 to "
                       f"{self.max_prompt_len}")
    if not 1 <= req.max_tokens <= self.max_tokens:
      raise ValueError(f"max_tokens must be in 1..{self.max_tokens}, got {req.max_tokens}")
    if not 0 <= req.seed < 2**32:
      raise ValueError(f"seed must be in 0..{2**32 - 1}, got {req.seed}")
    self.check_sampling(req)
    with self._lock:
      if self._closing:
        raise Closed("the server is shutting down" if self.error is None else
                     f"the decode loop failed ({self.error}); the server is restarting")
      if len(self._pending) + len(self._live) >= self.slots + self.max_queue:
        raise QueueFull(f"{self.slots} slots busy and {self.max_queue} requests queued")
      req.t_submit = time.perf_counter()
      self._pending.append(req)
      self._lock.notify()
    return req

  def stats(self) -> dict:
    """Counts for /health and /metrics."""
    with self._lock:
      return {"slots": self.slots, "live": len(self._live), "free": len(self._free),
              "queued": len(self._pending), "steps": self.steps, "closing": self._closing,
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
        while self._pending:
          self._finish(self._pending.popleft(), "cancelled")
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

  def _row_inputs(self, req: Request) -> tuple:
    """One request's prefill inputs: (seed, frequency penalty, controls)."""
    return (np.uint32(req.seed), np.float32(req.frequency_penalty),
            (np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p),
             np.float32(req.min_p)))

  def _admit_batch(self, reqs: list[Request], slots: list[int], plen: int,
                   rows: list[tuple] | None = None) -> tuple[SlotState, jax.Array]:
    """Dispatch one prefill of `reqs` (one prompt bucket `plen`) into `slots`, padded to the
    next compiled size (padding rows repeat the last request and are dropped); returns (state,
    first blocks (batch, k) on the device), not awaited."""
    x, pad, seeds, controls, slot_B, _, rows = self._prefill_inputs(reqs, slots, plen, rows)
    penalty = np.asarray([r[1] for r in rows], np.float32)
    return self._admit(self._params, self.state, x, pad, seeds, penalty, controls, slot_B)

  def _prefill_inputs(self, reqs: list[Request], slots: list[int], plen: int,
                      rows: list[tuple] | None = None) -> tuple:
    """The host arrays of one prefill, padded to the next compiled batch size (padding rows
    repeat the last request, and their slot, out of range, drops them): (prompts, left pads,
    seeds, controls, slots, and the padded requests and `_row_inputs` rows)."""
    rows = rows or [self._row_inputs(r) for r in reqs]
    batch = next(s for s in self.prefill_sizes if s >= len(reqs))
    x, pad = decode.pad_prompts([r.prompt_ids for r in reqs], batch, plen)
    reqs = list(reqs) + [reqs[-1]] * (batch - len(reqs))
    rows = rows + [rows[-1]] * (batch - len(rows))
    seeds = np.asarray([r[0] for r in rows], np.uint32)
    controls = sampling.Controls(*(np.asarray(c) for c in zip(*(r[2] for r in rows))))
    slot_B = np.asarray(list(slots) + [self.slots] * (batch - len(slots)), np.int32)
    return x, pad, seeds, controls, slot_B, reqs, rows

  def _deliver(self, req: Request, block: list[int]) -> None:
    """Append a block to a live request; ends it (freeing its slot) at EOS, max_tokens, a stop
    string, cancellation, or a failure of its own code."""
    if req.stopped or req.cancelled:
      self._release(req, "stop" if req.stopped else "cancelled")
      return
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
      self._release(req, reason)

  def _release(self, req: Request, reason: str) -> None:
    """End a request and free its slot at once: a step in flight that still advances the slot
    is delivered by request, and this one is no longer live (see _consume)."""
    with self._lock:
      if req.slot >= 0 and self._live.get(req.slot) is req:  # (never free a slot twice)
        self._live.pop(req.slot)
        bisect.insort(self._free, req.slot)
      req.slot = -1
    self._finish(req, reason)

  def _take_waiting(self) -> tuple[list[Request], list[Request], int]:
    """Under the lock: the oldest waiting request and the next ones of its prompt bucket, as
    many as free slots and the largest batch allow, each given the lowest free slot. Returns
    (admitted, cancelled while waiting, prompt bucket)."""
    taken, dropped, plen = [], [], 0
    with self._lock:
      while self._pending and self._pending[0].cancelled:
        dropped.append(self._pending.popleft())
      if self._free and self._pending:
        plen = decode.bucket_len(len(self._pending[0].prompt_ids))
        n = min(len(self._free), self.slots)
        for req in self._pending:
          if len(taken) == n:
            break
          if not req.cancelled and decode.bucket_len(len(req.prompt_ids)) == plen:
            taken.append(req)
        for req in taken:
          self._pending.remove(req)
          req.slot = self._free.pop(0)
          self._live[req.slot] = req
    return taken, dropped, plen

  def _admit_waiting(self) -> tuple[list[Request], jax.Array | None]:
    """At a block boundary: one batched prefill of waiting requests (one prompt bucket, so a
    boundary never waits for more than one prefill). Returns (the requests admitted, their
    first blocks on the device)."""
    taken, dropped, plen = self._take_waiting()
    for req in dropped:
      self._finish(req, "cancelled")
    admitted, rows = [], []
    for req in taken:
      try:  # this request's own inputs: a failure ends it alone
        rows.append(self._row_inputs(req))
        admitted.append(req)
      except Exception as e:
        log.exception("prefill failed")
        self._release(req, f"error: {type(e).__name__}: {e}")
    if not admitted:
      return [], None
    try:
      self.state, y = self._admit_batch(admitted, [r.slot for r in admitted], plen, rows)
      self.prefills[len(admitted)] += 1
      for req in admitted:
        req.planned = self._prefill_tokens
    except Exception as e:  # a failed dispatch: these requests fail (the donated state may be
      log.exception("prefill failed")  # lost: then the next step fails the loop)
      for req in admitted:
        self._release(req, f"error: {type(e).__name__}: {e}")
      return [], None
    return admitted, y

  def _compact(self) -> int:
    """The step size for the live requests: the smallest compiled size that holds them. Live
    rows at or above it move into free slots below it (they exist: size >= live count)."""
    size = next(s for s in self.sizes if s >= len(self._live))
    moves = []
    with self._lock:
      for src in sorted(s for s in self._live if s >= size):
        dst = self._free.pop(0)
        req = self._live.pop(src)
        self._live[dst], req.slot = req, dst
        bisect.insort(self._free, src)
        moves.append((src, dst))
    for src, dst in moves:
      self.state = self._move(self.state, np.int32(src), np.int32(dst))
      self.moves += 1
    return size

  def _consume(self, y_NxBxK: jax.Array, owners: dict[int, Request]) -> None:
    """Deliver one dispatch's blocks (n steps) to the requests it advanced (`owners`: {row at
    dispatch: request}) that are still live, wherever they have moved since."""
    y = jax.device_get(y_NxBxK)
    for row, req in owners.items():
      if self._live.get(req.slot) is req:  # a request that ended since gets nothing more
        self._deliver(req, self._row_tokens(y, row))

  def _step_key(self, size: int, n: int) -> tuple:
    """The program of a dispatch of n steps at `size` slots: the shortest compiled cache_len
    that holds every live row's writes (a row's cache holds its prompt bucket, then k positions
    per block before the last; a step writes its window, 2k positions for a PFLM, 1 for AR)."""
    window = 1 if self.spec.ar else 2 * self.k
    need = max((decode.bucket_len(len(r.prompt_ids)) + r.planned + (n - 2) * self.k + window
                for r in self._live.values()), default=0)
    return size, n, next(c for c in self.cache_lens if c >= need)

  def _row_tokens(self, y_NxBxK, row: int) -> list[int]:
    """One row's tokens of a dispatch's output (on the host), in order."""
    return y_NxBxK[:, row].reshape(-1).tolist()

  def _loop(self) -> None:
    """Admit (one batched prefill); compact; dispatch the next step at the size the live
    requests need; deliver the admitted requests' first blocks and the previous step's tokens
    while the device computes it."""
    inflight = None  # (blocks (n, size, k) on the device, {row: request}) not yet delivered
    try:
      while True:
        with self._lock:
          while (not self._live and not self._pending and inflight is None
                 and not self._closing):
            self._lock.wait()
          if self._closing and not self._live and not self._pending and inflight is None:
            return
        admitted, first = self._admit_waiting()
        step = None
        if self._live:
          size = self._compact()
          n = self.burst if all(r.max_tokens - r.planned >= self.burst * self._step_tokens
                                for r in self._live.values()) and not self._pending else 1
          key = self._step_key(size, n)
          self.state, y = self._steps[key](self._params, self.state)
          self.step_keys[key] += n
          self.steps += n
          self.bursts += n > 1
          self.step_sizes[size] += n
          for r in self._live.values():
            r.planned += n * self._step_tokens
          step = (y, dict(self._live))
        if admitted and first is not None:
          try:
            blocks = np.asarray(jax.device_get(first)).tolist()
          except Exception as e:  # their prefill failed on the device
            log.exception("prefill failed")
            blocks = None
            for req in admitted:
              self._release(req, f"error: {type(e).__name__}: {e}")
          for i, req in enumerate(admitted if blocks is not None else []):
            if self._live.get(req.slot) is req:
              self._deliver(req, blocks[i])
        if inflight is not None:
          self._consume(*inflight)
        inflight = step
    except Exception as e:  # an internal error: fail every request loudly, keep the traceback
      log.exception("decode loop failed")
      with self._lock:
        self.error = f"{type(e).__name__}: {e}"
        self._closing = True
        failed = list(self._live.values()) + list(self._pending)
        self._free = list(range(self.slots))
        self._live.clear()
        self._pending.clear()
        for req in failed:
          req.slot = -1
      for req in failed:
        self._finish(req, f"error: {e}")
