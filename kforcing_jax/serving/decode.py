"""K-token decoding over a KV cache (spec section 5) and the AR baseline on the same code.

PFLM(k): prefill [prompt ; k noise] in one pass, then fixed-shape steps of 2k positions
[the k tokens just produced ; k fresh noise]; argmax at the noise positions. AR: prefill the
prompt, then one position per step, sampled by inverse-CDF at tau from the same uniform stream
(or greedy). Both run through `Transformer.forward_cached`, the one cache code path.

Cache: per layer (B, H, S, head_dim), S = prompt bucket + max_new_tokens (rounded up to k). A
step writes all its positions' keys/values at slots [len, len + W) and attends to the cache
under a slot-causal mask; only the real tokens advance `len`, so a step's noise entries lie
beyond `len` and the next step overwrites them: only real tokens' keys/values are kept.

Prompts are LEFT-padded to a common bucket length; row b's real tokens start at slot pad_B[b],
its rotary positions are slot - pad_B[b] and keys at slots < pad_B[b] are masked, so a row
decodes exactly as it would alone (same positions, same visible keys).

Uniforms: token i of row b uses z = U(fold_in(key_b, i)), whatever k, batch or mesh. An AR
inverse-CDF rollout and a PFLM decode with the same row keys therefore see identical uniforms
(a perfect PFLM reproduces the AR tokens), and results do not depend on the batch a row is in.

Frequency penalty (reference code; the paper reports pure argmax): logits - penalty * count,
count = how often the token was generated so far in that row (prompt not counted), updated
token by token, also inside a k-block. EOS: a row that produced `eos_id` is done; its later
tokens are `fill_id`, its length stops, its counts freeze; the loop ends once every row is done.
"""

import dataclasses
import math
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kforcing_jax.distill import sampling
from kforcing_jax.parallel import sharding
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.training import stage_io

KEY_IMPL = "threefry2x32"
STREAM_BASE = 1 << 30  # fold_in tag of stream s > 0; token indices stay below it


@dataclasses.dataclass(frozen=True)
class DecodeSpec(sampling.ControlFields):
  """Static decode settings (hashable): one compiled program per (spec, batch, prompt bucket)."""
  k: int  # tokens per step: the PFLM window k' (<= the trained k); 1 for the AR baseline
  max_new_tokens: int
  ar: bool = False  # the AR baseline: one position per step, no noise encoder
  # Temperature. AR: logits / tau, 0 = greedy (argmax); PFLM: fed to the noise encoder (0: the
  # greedy mode of a stage trained with distill.greedy_share), argmax always.
  tau: float = 1.0
  # AR only (sampling.filter_logits): a PFLM's samples are fixed by its noise, so filters other
  # than the temperature would need a student trained on them.
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  frequency_penalty: float = 0.0
  eos_id: int | None = None  # None: always max_new_tokens (benchmarks)
  fill_id: int = 0  # written after a row's EOS

  def __post_init__(self):
    if self.k < 1 or (self.ar and self.k != 1):
      raise ValueError(f"DecodeSpec.k must be >= 1 (and 1 for ar=True), got k={self.k}")
    if self.max_new_tokens < 1:
      raise ValueError(f"DecodeSpec.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    sampling.check_controls(self.tau, self.top_k, self.top_p, self.min_p)
    on = sampling.active_filters(self.top_k, self.top_p, self.min_p)
    if on and not self.ar:
      raise ValueError(f"DecodeSpec.{on[0]} is an AR option: a PFLM samples through its noise "
                       "at its trained temperatures only")

  @property
  def n_blocks(self) -> int:
    """Forward passes: the prefill plus n_blocks - 1 steps."""
    return -(-self.max_new_tokens // self.k)

  @property
  def buffer_len(self) -> int:
    return self.n_blocks * self.k

  def cache_slots(self, prompt_len: int) -> int:
    return prompt_len + self.buffer_len


@flax.struct.dataclass
class DecodeState:
  """Everything the loop carries; fixed shapes, so one compiled step serves every position."""
  tokens_BxT: jax.Array  # generated tokens (T = spec.buffer_len); fill_id after EOS
  cache_k: tuple  # per layer (B, H, S, head_dim)
  cache_v: tuple
  cache_len: jax.Array  # () int32: slots holding real tokens (same for every row)
  pad_B: jax.Array  # left padding of each row's prompt
  keys_Bx2: jax.Array  # per-row uint32 key data of the uniform stream
  step: jax.Array  # () int32: blocks produced so far
  done_B: jax.Array  # row produced EOS
  length_B: jax.Array  # generated tokens per row (EOS included)
  counts_BxV: jax.Array  # generated-token counts for the frequency penalty ((B, 0) when off)


# ---- uniform stream ----


def row_keys(seed: int, row_ids: Sequence[int]) -> np.ndarray:
  """(B, 2) uint32 key data: row r's stream is fold_in(key(seed), row_ids[r])."""
  base = jax.random.key(seed, impl=KEY_IMPL)
  ids = jnp.asarray(np.asarray(row_ids, np.uint32))
  return np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)))


def seed_keys(seeds_B: jax.Array, row: int = 0) -> jax.Array:
  """(B, 2) key data, traced: row_keys(seed, [row]) of each uint32 seed (the serving engine
  derives its requests' keys inside its jitted prefill, not on the host)."""
  one = lambda s: jax.random.key_data(jax.random.fold_in(jax.random.key(s, impl=KEY_IMPL), row))
  return jax.vmap(one)(seeds_B)


def uniforms(keys_Bx2: jax.Array, first: jax.Array | int, n: int, stream: int = 0) -> jax.Array:
  """(B, n) float32 uniforms of token indices first .. first + n - 1 of each row's stream.

  `first` is () or per row (B,) (ragged batches). stream 0 is the tokens' stream (the AR
  teacher's inverse-CDF and the PFLM's noise); other streams (speculative decoding's draft and
  acceptance draws) are independent of it and of each other.
  """
  b = keys_Bx2.shape[0]
  idx_BxN = jnp.broadcast_to(jnp.asarray(first, jnp.int32), (b,))[:, None] + jnp.arange(
      n, dtype=jnp.int32)

  def row(kd, idx_N):
    key = jax.random.wrap_key_data(kd, impl=KEY_IMPL)
    if stream:
      key = jax.random.fold_in(key, STREAM_BASE + stream)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), ()))(idx_N)

  return jax.vmap(row)(keys_Bx2, idx_BxN)


def noise(m, keys_Bx2, first, k: int, tau) -> jax.Array:
  """Noise embeddings (B, k, D) of the k uniforms from token index `first` (() or per row), at
  temperature tau (a number, or per row (B,))."""
  z_BxK = uniforms(keys_Bx2, first, k)
  tau = jnp.asarray(tau, jnp.float32)
  if tau.ndim:  # per row: one per noise token, so the embedding equals a scalar tau's
    tau = jnp.broadcast_to(tau[:, None], z_BxK.shape)
  return m.noise_encoder(z_BxK, tau).astype(model_lib.RESIDUAL_DTYPE)


def choose(spec: DecodeSpec, logits_BxKxV, keys_Bx2, first, done_B, length_B, counts_BxV,
           penalty_B: jax.Array | None = None, controls: sampling.Controls | None = None):
  """The k tokens of a block, one at a time (the penalty sees earlier tokens of the block).
  `first`: () or per-row (B,) index of the block's first token in the rows' streams.
  `penalty_B` / `controls`: per-row frequency penalties / sampling controls (the serving
  engine) instead of the spec's. A PFLM takes the argmax; the AR baseline samples."""
  b = logits_BxKxV.shape[0]
  if spec.ar:
    static = controls is None
    controls = spec.controls if static else controls
    z_BxK = None if static and spec.greedy else uniforms(keys_Bx2, first, spec.k)
  alive, rows, ys = ~done_B, jnp.arange(b), []
  penalize = penalty_B is not None or spec.frequency_penalty
  for j in range(spec.k):
    logits_BxV = logits_BxKxV[:, j]
    if penalty_B is not None:
      logits_BxV = logits_BxV - penalty_B[:, None] * counts_BxV.astype(jnp.float32)
    elif spec.frequency_penalty:
      logits_BxV = logits_BxV - spec.frequency_penalty * counts_BxV.astype(jnp.float32)
    if spec.ar:
      y_B = controls.sample(logits_BxV, None if z_BxK is None else z_BxK[:, j])
    else:
      y_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    y_B = jnp.where(alive, y_B, spec.fill_id)
    if penalize:
      counts_BxV = counts_BxV.at[rows, y_B].add(alive.astype(counts_BxV.dtype))
    length_B = length_B + alive.astype(jnp.int32)
    if spec.eos_id is not None:
      alive = alive & (y_B != spec.eos_id)
    ys.append(y_B)
  return jnp.stack(ys, axis=1), ~alive, length_B, counts_BxV


def block_logits(m: model_lib.Transformer, spec: DecodeSpec, tokens_BxW: jax.Array, keys_Bx2,
                 first, cache_k, cache_v, start, pad_B, fresh: bool = False, tau_B=None):
  """One decode pass: [tokens ; k noise from stream index `first`] (a PFLM) or the tokens (AR)
  through the KV cache at `start`; `first` and `start` are () or per row; tau_B: per-row noise
  temperatures instead of spec.tau. Returns (logits of the block's k outputs (B, k, V),
  cache_k, cache_v). Offline decoding and the serving engine both run every prefill and step
  through here."""
  x = m.embed(tokens_BxW)
  if not spec.ar:
    tau = spec.tau if tau_B is None else tau_B
    x = jnp.concatenate([x, noise(m, keys_Bx2, first, spec.k, tau)], axis=1)
  h, cache_k, cache_v = m.forward_cached(x, cache_k, cache_v, start, pad_B, n_out=spec.k,
                                        fresh=fresh)
  return m.logits(h), cache_k, cache_v


def prefill(m: model_lib.Transformer, spec: DecodeSpec, prompt_BxP: jax.Array, pad_B: jax.Array,
            keys_Bx2: jax.Array, cache_sharding: NamedSharding | None = None):
  """First block: [prompt ; k noise] (PFLM) or the prompt (AR). Returns (state, logits BxKxV)."""
  cfg = m.cfg
  b, plen = prompt_BxP.shape
  cache_k, cache_v = model_lib.init_cache(cfg, b, spec.cache_slots(plen), cache_sharding)
  logits, cache_k, cache_v = block_logits(m, spec, prompt_BxP, keys_Bx2, 0, cache_k, cache_v,
                                          jnp.zeros((), jnp.int32), pad_B, fresh=True)
  counts = jnp.zeros((b, cfg.vocab_size if spec.frequency_penalty else 0), jnp.int32)
  y_BxK, done, length, counts = choose(spec, logits, keys_Bx2, 0, jnp.zeros((b,), bool),
                                        jnp.zeros((b,), jnp.int32), counts)
  tokens = jnp.full((b, spec.buffer_len), spec.fill_id, jnp.int32)
  tokens = jax.lax.dynamic_update_slice(tokens, y_BxK, (0, 0))
  state = DecodeState(tokens_BxT=tokens, cache_k=cache_k, cache_v=cache_v,
                      cache_len=jnp.asarray(plen, jnp.int32), pad_B=pad_B.astype(jnp.int32),
                      keys_Bx2=keys_Bx2, step=jnp.ones((), jnp.int32), done_B=done,
                      length_B=length, counts_BxV=counts)
  return state, logits


def decode_step(m: model_lib.Transformer, spec: DecodeSpec, state: DecodeState):
  """One block: feed the previous block's k tokens (+ k noise for a PFLM) -> the next k."""
  k = spec.k
  first = state.step * k
  prev_BxK = jax.lax.dynamic_slice_in_dim(state.tokens_BxT, first - k, k, axis=1)
  logits, cache_k, cache_v = block_logits(m, spec, prev_BxK, state.keys_Bx2, first,
                                          state.cache_k, state.cache_v, state.cache_len,
                                          state.pad_B)
  y_BxK, done, length, counts = choose(spec, logits, state.keys_Bx2, first, state.done_B,
                                        state.length_B, state.counts_BxV)
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxT, y_BxK, first, axis=1)
  state = state.replace(tokens_BxT=tokens, cache_k=cache_k, cache_v=cache_v,
                        cache_len=state.cache_len + k, step=state.step + 1, done_B=done,
                        length_B=length, counts_BxV=counts)
  return state, logits


def generate(m: model_lib.Transformer, spec: DecodeSpec, prompt_BxP: jax.Array, pad_B: jax.Array,
             keys_Bx2: jax.Array, cache_sharding: NamedSharding | None = None):
  """The whole generation as one `lax.while_loop`: (tokens (B, T), lengths (B,))."""
  state, _ = prefill(m, spec, prompt_BxP, pad_B, keys_Bx2, cache_sharding)

  def cond(s):
    return (s.step < spec.n_blocks) & ~jnp.all(s.done_B)

  state = jax.lax.while_loop(cond, lambda s: decode_step(m, spec, s)[0], state)
  return state.tokens_BxT, state.length_B


def run_steps(m: model_lib.Transformer, spec: DecodeSpec, state: DecodeState, n: int):
  """`n` decode steps in a fori_loop (benchmarks time steps without dispatch overhead)."""
  return jax.lax.fori_loop(0, n, lambda _, s: decode_step(m, spec, s)[0], state)


# ---- batching: padding, shardings, compiled programs ----

# XLA:CPU hands matmuls to YNNPACK by default. Inside the decode loop its kernels were ~15% slower
# than XLA's own dot emitter for matmuls of <= 64 rows on a model whose weights sit in cache
# (the 12 MB default: PFLM k=4 step at batch 1, 4.1 vs 3.5 ms) and faster for larger ones
# (prefill, batch >= 16), so such programs are compiled without it. Weights streamed from memory
# turn that around: SmolLM2-135M's greedy AR decode at batch 4 ran 24.6 tokens/s with XLA's
# emitter and 60.0 with YNNPACK (batch 1 and 16 equal; round-robin on the 2-core machine).
# Other platforms ignore this.
SMALL_MATMUL_ROWS = 64
SMALL_WEIGHT_BYTES = 64 << 20
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str, matmul_rows: int, weight_bytes: int = 0) -> dict | None:
  """Per-program XLA options for a program whose matmuls have `matmul_rows` rows over
  `weight_bytes` of weights."""
  small = matmul_rows <= SMALL_MATMUL_ROWS and weight_bytes <= SMALL_WEIGHT_BYTES
  return dict(_NO_YNN) if platform == "cpu" and small else None


def weight_bytes(params) -> int:
  """Bytes of a parameter pytree (global sizes)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


def bucket_len(n: int, minimum: int = 8) -> int:
  """Prompt bucket: the next power of two (>= minimum), to bound the number of programs."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def pad_prompts(prompts: Sequence[Sequence[int]], batch: int, prompt_len: int,
                fill_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad prompts into (batch, prompt_len); missing rows repeat the last prompt."""
  if not prompts:
    raise ValueError("no prompts")
  rows = list(prompts) + [prompts[-1]] * (batch - len(prompts))
  out = np.full((batch, prompt_len), fill_id, np.int32)
  pad = np.zeros((batch,), np.int32)
  for r, p in enumerate(rows):
    if not 1 <= len(p) <= prompt_len:
      raise ValueError(f"prompt {r} has {len(p)} tokens; need 1..{prompt_len} (a prompt must "
                       "have at least one token, e.g. the tokenizer's eos_id as BOS)")
    pad[r] = prompt_len - len(p)
    out[r, pad[r]:] = np.asarray(p, np.int32)
  return out, pad


def state_shardings(mesh: Mesh, n_layers: int) -> DecodeState:
  """Batch over 'data'; the caches' heads over 'model'; scalars replicated."""
  ranks = DecodeState(tokens_BxT=2, cache_k=(4,) * n_layers, cache_v=(4,) * n_layers,
                      cache_len=0, pad_B=1, keys_Bx2=2, step=0, done_B=1, length_B=1,
                      counts_BxV=2)
  return sharding.decode_state_shardings(mesh, ranks)


@dataclasses.dataclass
class Completion:
  tokens: list[int]  # generated ids up to and including EOS (if any)
  finished: bool  # stopped at EOS


class Engine:
  """Jitted decoding of one model (AR teacher or PFLM) on a mesh; notebook-friendly.

  engine = Engine.from_stage(stage_io.load_stage(workdir, "k4"))
  outs = engine.generate([[eos, 12, 7]], DecodeSpec(k=4, max_new_tokens=64))
  """

  def __init__(self, graphdef, params: dict, model_cfg: model_lib.ModelConfig, trained_k: int,
               mesh: Mesh | None = None, temperatures: stage_io.Temperatures | None = None):
    self.graphdef, self.params, self.cfg, self.trained_k = graphdef, params, model_cfg, trained_k
    self.temperatures = temperatures or stage_io.Temperatures.from_meta({}, trained_k)
    self.mesh = mesh if mesh is not None else jax.tree.leaves(params)[0].sharding.mesh
    model_axis = self.mesh.shape[sharding.MODEL]
    if model_cfg.n_heads % model_axis:
      raise ValueError(f"mesh 'model' axis {model_axis} does not divide model n_heads="
                       f"{model_cfg.n_heads}")
    self.data_size = self.mesh.shape[sharding.DATA]
    self._param_sh = jax.tree.map(lambda x: x.sharding, params)
    self._programs: dict = {}

  @classmethod
  def from_stage(cls, loaded) -> "Engine":
    """From a `stage_io.LoadedStage`."""
    return cls(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.k, loaded.mesh,
               loaded.temperatures)

  def check(self, spec: DecodeSpec) -> None:
    if self.trained_k == 0 and not spec.ar:
      raise ValueError("this is an AR checkpoint (stage 'teacher'): decode it with ar=True")
    if not spec.ar and spec.k > self.trained_k:
      raise ValueError(f"k={spec.k} exceeds the checkpoint's trained window k={self.trained_k}")
    if not spec.ar:
      self.temperatures.check(spec.tau, f"this k={self.trained_k} stage")

  def padded_batch(self, n: int) -> int:
    return -(-n // self.data_size) * self.data_size

  def _program(self, kind: str, spec: DecodeSpec, batch: int, plen: int, n_steps: int = 0):
    key = (kind, spec, batch, plen, n_steps)
    if key in self._programs:
      return self._programs[key]
    gd, mesh = self.graphdef, self.mesh
    st_sh = state_shardings(mesh, self.cfg.n_layers)
    d1, d2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
    merge = lambda p: model_lib.merge(gd, p)
    ins = (self._param_sh, d2, d1, d2)
    # Matmul rows per device: the prefill's, or one step's (the steps dominate `generate`).
    width = plen + (0 if spec.ar else spec.k) if kind == "prefill" else (
        1 if spec.ar else 2 * spec.k)
    opts = compiler_options(mesh.devices.flat[0].platform, batch // self.data_size * width,
                            weight_bytes(self.params))
    if kind == "generate":
      fn = jax.jit(lambda p, x, pad, keys: generate(merge(p), spec, x, pad, keys, st_sh.cache_k[0]),
                   in_shardings=ins, out_shardings=(d2, d1), compiler_options=opts)
    elif kind == "prefill":
      fn = jax.jit(
          lambda p, x, pad, keys: prefill(merge(p), spec, x, pad, keys, st_sh.cache_k[0])[0],
          in_shardings=ins, out_shardings=st_sh, compiler_options=opts)
    elif kind == "step":
      fn = jax.jit(lambda p, s: decode_step(merge(p), spec, s)[0],
                   in_shardings=(self._param_sh, st_sh), out_shardings=st_sh, donate_argnums=1,
                   compiler_options=opts)
    elif kind == "steps":
      fn = jax.jit(lambda p, s: run_steps(merge(p), spec, s, n_steps),
                   in_shardings=(self._param_sh, st_sh), out_shardings=st_sh, donate_argnums=1,
                   compiler_options=opts)
    else:
      raise ValueError(kind)
    self._programs[key] = fn
    return fn

  def device_inputs(self, prompts: Sequence[Sequence[int]], seed: int = 0,
                    row_ids: Sequence[int] | None = None, prompt_len: int | None = None,
                    fill_id: int = 0, batch_size: int | None = None):
    """(prompt_BxP, pad_B, keys_Bx2) on the mesh; the batch is padded to `batch_size` (if
    given: one program for every batch of a file) rounded up to the data-axis multiple."""
    n = len(prompts)
    if batch_size is not None and batch_size < n:
      raise ValueError(f"batch_size={batch_size} < {n} prompts")
    batch = self.padded_batch(max(n, batch_size or 0))
    plen = prompt_len or bucket_len(max(len(p) for p in prompts))
    x, pad = pad_prompts(prompts, batch, plen, fill_id)
    ids = list(range(n)) if row_ids is None else list(row_ids)
    if len(ids) != n:
      raise ValueError(f"row_ids has {len(ids)} entries for {n} prompts")
    keys = row_keys(seed, ids + [ids[-1]] * (batch - n))
    d1, d2 = sharding.batch_sharding(self.mesh, 1), sharding.batch_sharding(self.mesh, 2)
    return jax.device_put(x, d2), jax.device_put(pad, d1), jax.device_put(keys, d2)

  def generate_arrays(self, spec: DecodeSpec, prompt_BxP, pad_B, keys_Bx2):
    """Device arrays in, (tokens (B, T), lengths (B,)) device arrays out (no host sync)."""
    self.check(spec)
    fn = self._program("generate", spec, prompt_BxP.shape[0], prompt_BxP.shape[1])
    return fn(self.params, prompt_BxP, pad_B, keys_Bx2)

  def generate(self, prompts: Sequence[Sequence[int]], spec: DecodeSpec, seed: int = 0,
               row_ids: Sequence[int] | None = None, batch_size: int | None = None,
               prompt_len: int | None = None) -> list[Completion]:
    """Decode a batch of token-id prompts; row r's uniforms come from (seed, row_ids[r])."""
    inputs = self.device_inputs(prompts, seed, row_ids, prompt_len, spec.fill_id, batch_size)
    tokens, lengths = jax.device_get(self.generate_arrays(spec, *inputs))
    return _completions(spec, tokens[:len(prompts)], lengths[:len(prompts)])

  def stream(self, prompts: Sequence[Sequence[int]], spec: DecodeSpec, seed: int = 0,
             row_ids: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Interactive variant: yields each block's new tokens (n_prompts, k) as it is produced
    (fill_id after a row's EOS), through the same jitted step; stops when every row is done."""
    self.check(spec)
    inputs = self.device_inputs(prompts, seed, row_ids, fill_id=spec.fill_id)
    batch, plen = inputs[0].shape
    state = self._program("prefill", spec, batch, plen)(self.params, *inputs)
    step_fn = self._program("step", spec, batch, plen)
    for s in range(spec.n_blocks):
      if s:
        state = step_fn(self.params, state)
      block, done = jax.device_get((state.tokens_BxT[:, s * spec.k:(s + 1) * spec.k],
                                    state.done_B))
      yield block[:len(prompts)]
      if done[:len(prompts)].all() and spec.eos_id is not None:
        return


def truncate(row_T: np.ndarray, length: int, max_new_tokens: int,
             eos_id: int | None) -> tuple[list[int], bool]:
  """A row's generated ids (its length, at most max_new_tokens) and whether they end at EOS:
  the one host-side cut of every decoder's token buffer (offline, speculative)."""
  n = min(int(length), max_new_tokens)
  toks = [int(t) for t in row_T[:n]]
  return toks, eos_id is not None and bool(toks) and toks[-1] == eos_id


def _completions(spec: DecodeSpec, tokens_BxT: np.ndarray, length_B: np.ndarray):
  return [Completion(*truncate(row, n, spec.max_new_tokens, spec.eos_id))
          for row, n in zip(tokens_BxT, length_B)]
