"""The AR backbone (spec section 2): embeddings, pre-norm blocks, output norm + biased head.

Two attention paths share every weight: the full causal pass used in training, and
`forward_cached`, the one pass over a fixed-size KV cache that every decode method uses.
"""

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kforcing_jax.model import attention, layers

MASKED_LOGIT = -1000.0  # The reserved mask token is never produced.
# The residual stream (embeddings, noise embeddings, block outputs) and the norms stay float32
# whatever cfg.dtype is; cfg.dtype only sets the matmul inputs (MaxText-style mixed precision).
# A bfloat16 residual would round away the small changes of z that move the inverse-CDF targets.
RESIDUAL_DTYPE = jnp.float32

# Per-layer attention: (layer_index, q, k, v) -> out, all (B, H, L, head_dim).
LayerAttendFn = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


# Values of ModelConfig's option fields; the first of each is the authors' backbone.
NORMS = ("scale", "rms")
MLPS = ("gelu", "swiglu")
ATTENTIONS = ("causal", "bidirectional")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture; saved as JSON beside every checkpoint. The defaults are the authors'
  backbone (spec section 2); the other options cover Llama-family models (Llama, Qwen2,
  Mistral, SmolLM): RMSNorm, SwiGLU, grouped-query attention, tied embeddings, q/k/v biases.
  Fields added after a work dir was made take their defaults, so older JSONs still load."""
  vocab_size: int
  # Reserved mask token whose logit is forced to MASKED_LOGIT; None: no such token (imported
  # models). The PFLM feeds noise embeddings, so it needs no mask token either.
  mask_id: int | None
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  mlp_ratio: int = 4
  rope_base: float = 10000.0
  dtype: str = "float32"
  # Highest frequency of the noise encoder's features of z (cycles over [0, 1]); 1 is the
  # authors' encoder. Absent from older checkpoints' JSON, hence a default.
  noise_max_freq: float = 1.0
  norm: str = "scale"  # "scale": LayerNorm without bias (the authors'); "rms": RMSNorm.
  norm_eps: float = 1e-5
  mlp: str = "gelu"  # "gelu": tanh-GELU with biases (the authors'); "swiglu": gated, no biases.
  mlp_hidden: int = 0  # MLP hidden width; 0 = mlp_ratio * d_model.
  n_kv_heads: int = 0  # Key/value heads (grouped-query attention); 0 = n_heads.
  head_size: int = 0  # Per-head width; 0 = d_model // n_heads.
  # Llama-3 rope scaling (factor, low_freq_factor, high_freq_factor, original max positions);
  # () = none.
  rope_scaling: tuple = ()
  tie_embeddings: bool = False  # Output head = the token embedding table transposed.
  qkv_bias: bool = False  # Biases on q/k/v (Qwen2).
  head_bias: bool = True  # Bias on the output head (the authors'; zero-initialised).
  # "causal": the AR teacher and the PFLMs; "bidirectional": the masked-diffusion stage (mdlm),
  # which denoises [prompt ; masked continuation] with every position seeing every other
  # (`bidirectional_logits`), so it has no causal pass and no KV-cache decode.
  attention: str = "causal"

  def __post_init__(self):  # JSON gives lists; keep the config hashable.
    object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling or ()))

  @property
  def head_dim(self) -> int:
    return self.head_size or self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def mlp_width(self) -> int:
    return self.mlp_hidden or self.mlp_ratio * self.d_model

  def validate(self) -> "ModelConfig":
    """Raises ValueError naming the first inconsistent field."""
    checks = (
        (self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}"),
        (self.mlp in MLPS, "mlp", f"must be one of {MLPS}, got {self.mlp!r}"),
        (self.attention in ATTENTIONS, "attention",
         f"must be one of {ATTENTIONS}, got {self.attention!r}"),
        (self.attention == "causal" or self.mask_id is not None, "attention",
         "bidirectional (masked diffusion) needs a mask token (mask_id)"),
        (self.n_heads % self.kv_heads == 0, "n_kv_heads",
         f"{self.kv_heads} must divide n_heads={self.n_heads}"),
        (self.head_dim % 2 == 0, "head_size", f"head_dim {self.head_dim} must be even (rotary)"),
        (self.mask_id is None or 0 <= self.mask_id < self.vocab_size, "mask_id",
         f"{self.mask_id} is outside the vocabulary (V={self.vocab_size})"),
        (len(self.rope_scaling) in (0, 4), "rope_scaling",
         f"must be () or (factor, low, high, original_max_positions), got {self.rope_scaling}"),
    )
    for ok, name, message in checks:
      if not ok:
        raise ValueError(f"model config {name}: {message}")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def init_cache(cfg: ModelConfig, batch: int, slots: int, sharding=None) -> tuple[tuple, tuple]:
  """Empty KV cache: per-layer k and v, each (B, Hkv, slots, head_dim) (see `forward_cached`)."""
  def zeros():
    z = jnp.zeros((batch, cfg.kv_heads, slots, cfg.head_dim), jnp.dtype(cfg.dtype))
    return z if sharding is None else jax.lax.with_sharding_constraint(z, sharding)
  return tuple(zeros() for _ in range(cfg.n_layers)), tuple(zeros() for _ in range(cfg.n_layers))


def write_slots(cache_BxHxSxK: jax.Array, new_BxHxWxK: jax.Array, start: jax.Array) -> jax.Array:
  """Write W new entries at slots start..start+W-1; `start` () or per row (B,)."""
  new = new_BxHxWxK.astype(cache_BxHxSxK.dtype)
  if jnp.ndim(start) == 0:
    return jax.lax.dynamic_update_slice(cache_BxHxSxK, new, (0, 0, start, 0))
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(
      cache_BxHxSxK, new, start)


class Transformer(nnx.Module):
  """Token embeddings -> blocks -> final norm -> Linear(d, V) (zero-initialised, with a bias,
  unless the config ties it to the embeddings or drops the bias)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg.validate()
    d = cfg.d_model
    self.vocab_embed = nnx.Param(
        jax.nn.initializers.normal(layers.INIT_STD)(rngs.params(), (cfg.vocab_size, d)),
        out_sharding=("vocab", "embed"))
    self.blocks = nnx.List([layers.Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.norm_final = layers.Norm(d, cfg.norm, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.head = nnx.Param(jnp.zeros((d, cfg.vocab_size), jnp.float32),
                            out_sharding=("embed", "vocab"))
    if cfg.head_bias:
      self.head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32),
                                 out_sharding=("vocab",))

  def embed(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.vocab_embed[...], tokens_BxL, axis=0).astype(RESIDUAL_DTYPE)

  def logits(self, h_BxLxD: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Float32 logits, the mask token's (if any) forced to MASKED_LOGIT. scale (broadcasting
    against h's leading axes): logits * scale, applied to the d-wide normalised state and the
    bias rather than to the V-wide logits (per-sequence temperatures in training: 1 / tau)."""
    h = self.norm_final(h_BxLxD).astype(jnp.float32)
    if scale is not None:
      h = h * scale
    if self.cfg.tie_embeddings:
      out = jnp.einsum("...d,vd->...v", h, self.vocab_embed[...])
    else:
      out = h @ self.head[...]
    if self.cfg.head_bias:
      out = out + (self.head_bias[...] if scale is None else self.head_bias[...] * scale)
    if self.cfg.mask_id is None:
      return out
    return out.at[..., self.cfg.mask_id].set(MASKED_LOGIT)

  def run_blocks(self, x_BxLxD: jax.Array, pos_BxL: jax.Array, attend: LayerAttendFn,
                 keep_last: int | None = None):
    """All blocks with a caller-chosen attention; returns hidden states and per-layer (k, v).

    keep_last=n: only the last n positions' outputs are wanted (decoding), so the last block
    runs its attention queries, output projection and MLP on those rows alone; its keys/values
    (and every earlier block) still cover all L positions. Returns hidden states (B, n, D).
    """
    inv_freq = layers.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_base, self.cfg.rope_scaling)
    cos, sin = layers.rotary_tables(pos_BxL, inv_freq)
    kvs = []
    for i, block in enumerate(self.blocks):
      q, k, v = block.qkv(x_BxLxD, cos, sin)
      if keep_last is not None and i == len(self.blocks) - 1:
        q, x_BxLxD = q[:, :, -keep_last:], x_BxLxD[:, -keep_last:]
      x_BxLxD = block.finish(x_BxLxD, attend(i, q, k, v))
      kvs.append((k, v))
    return x_BxLxD, kvs

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Causal forward: logits (B, L, V) for the next token at every position."""
    h, _ = self.context_pass(tokens_BxL)
    return self.logits(h)

  def _require_causal(self, what: str) -> None:
    if self.cfg.attention != "causal":
      raise ValueError(f"{what} is a causal pass; this model is {self.cfg.attention} (a masked-"
                       "diffusion stage: bidirectional_logits, decoded with method 'mdlm')")

  def bidirectional_logits(self, tokens_BxL: jax.Array, pad_B: jax.Array | None = None,
                           len_B: jax.Array | None = None, n_out: int | None = None,
                           mass_to_BxL: jax.Array | None = None):
    """The masked-diffusion (MDLM) pass: logits (B, L, V) at every position (the last n_out
    only, if given), each position attending to its whole row (`attention.span_mask`). Row b's
    tokens occupy [pad_B[b], len_B[b]) (default: all L); its rotary positions start at 0 at
    pad_B[b]. Which token each output predicts is the objective's choice (diffusion/mdlm.py).
    mass_to_BxL: also return, per output, the last block's attention share on those positions
    (`attention.attention_mass`): (logits, mass (B, n_out or L))."""
    b, n = tokens_BxL.shape
    pad_B = jnp.zeros((b,), jnp.int32) if pad_B is None else pad_B.astype(jnp.int32)
    len_B = jnp.full((b,), n, jnp.int32) if len_B is None else len_B.astype(jnp.int32)
    mask = attention.span_mask(pad_B, len_B, n)
    pos_BxL = jnp.arange(n, dtype=jnp.int32)[None, :] - pad_B[:, None]
    mass = []

    def attend(i, q, k, v):
      if mass_to_BxL is not None and i == self.cfg.n_layers - 1:
        mass.append(attention.attention_mass(q, k, mask, mass_to_BxL))
      return attention.dense_attention(q, k, v, mask)

    h, _ = self.run_blocks(self.embed(tokens_BxL), pos_BxL, attend, keep_last=n_out)
    return self.logits(h) if mass_to_BxL is None else (self.logits(h), mass[0])

  # ---- two-stream passes (spec section 3); used by the PFLM student and the teacher rollouts ----

  def context_pass(self, tokens_BxN: jax.Array):
    """Plain causal pass; returns hidden states and per-layer context (k, v) for window passes."""
    self._require_causal("the causal forward")
    return self.run_blocks(self.embed(tokens_BxN), _positions(tokens_BxN.shape),
                           lambda i, q, k, v: attention.causal_attention(q, k, v))

  def window_pass(self, ctx_kvs, x_BxNxWxD: jax.Array, valid_W: jax.Array | None = None,
                  cache: tuple | None = None, start: jax.Array | int = 0):
    """Hidden states (B, N, W, D) of the window tokens of every context position t (rotary
    positions t+1..t+W), attending to the context's (k, v) with one joint softmax.

    cache (per-layer (k, v), each (B, H, N, S, K), from `init_window_cache`): x holds window
    slots start..start+W-1 only; they attend to the cached slots before them and to each other,
    and their (k, v) are written into the cache. Returns (hidden, cache) then: a rollout round
    computes just its new slots instead of the whole window again.
    """
    b, n, w, d = x_BxNxWxD.shape
    pos = (jnp.arange(n)[:, None] + 1 + start + jnp.arange(w)[None, :]).reshape(1, n * w)
    new_cache = None if cache is None else list(cache)

    def attend(i, q, k, v):
      split = lambda a: a.reshape(b, a.shape[1], n, w, a.shape[-1])
      kc, vc = ctx_kvs[i]
      kw, vw = split(k), split(v)
      if cache is not None:
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, 3)
        kw, vw = put(cache[i][0], kw), put(cache[i][1], vw)
        new_cache[i] = (kw, vw)
      out = attention.window_attention(split(q), kc, vc, kw, vw, valid_W, q_slot0=start)
      return out.reshape(q.shape)

    h, _ = self.run_blocks(x_BxNxWxD.reshape(b, n * w, d).astype(RESIDUAL_DTYPE),
                           jnp.broadcast_to(pos, (b, n * w)), attend)
    h = h.reshape(b, n, w, d)
    return h if cache is None else (h, tuple(new_cache))

  def init_window_cache(self, batch: int, n: int, slots: int) -> tuple:
    """Empty per-layer window (k, v) for `window_pass(cache=...)`: (B, Hkv, N, slots, K) each."""
    shape = (batch, self.cfg.kv_heads, n, slots, self.cfg.head_dim)
    dt = jnp.dtype(self.cfg.dtype)
    return tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(self.cfg.n_layers))

  def window_pass_dense(self, tokens_BxN, x_BxNxWxD, valid_W=None):
    """Reference for `window_pass`: one sequence [context ; windows] under the dense
    (N + N*W)^2 mask, as the paper's code does. Tests and benchmarks only."""
    b, n, w, d = x_BxNxWxD.shape
    x = jnp.concatenate([self.embed(tokens_BxN), x_BxNxWxD.reshape(b, n * w, d).astype(
        RESIDUAL_DTYPE)], axis=1)
    pos_w = (jnp.arange(n)[:, None] + 1 + jnp.arange(w)[None, :]).reshape(n * w)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(n), pos_w]), (b, n + n * w))
    mask = attention.two_stream_dense_mask(n, w, valid_W)
    h, _ = self.run_blocks(x, pos, lambda i, q, k, v: attention.dense_attention(q, k, v, mask))
    return h[:, n:].reshape(b, n, w, d)

  def forward_cached(self, x_BxWxD: jax.Array, cache_k: tuple, cache_v: tuple,
                     start: jax.Array, pad_B: jax.Array | None = None, n_out: int | None = None,
                     fresh: bool = False):
    """The one KV-cache forward (every decode method runs through it).

    W new positions (embedded tokens, or noise embeddings) at cache slots start..start+W-1;
    `start` is () or per row (B,) for ragged batches. Row b's prompt is left-padded by pad_B[b],
    so its rotary position is slot - pad_B[b]. Every position's keys/values are written; the
    caller advances a row's length only past its real tokens, so noise (and rejected drafts)
    are overwritten by the next call and never seen (`attention.decode_mask`). fresh=True: the
    cache is empty (a prefill at start 0), so attend among the new positions only.
    n_out: only the last n_out positions' hidden states are wanted (the last block computes
    nothing else). Returns (hidden (B, n_out or W, D), cache_k, cache_v).
    """
    self._require_causal("forward_cached")
    b, w, _ = x_BxWxD.shape
    pad_B = jnp.zeros((b,), jnp.int32) if pad_B is None else pad_B.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    slot_BxW = jnp.broadcast_to(start, (b,))[:, None] + jnp.arange(w, dtype=jnp.int32)
    mask = attention.decode_mask(start, pad_B, w, w if fresh else cache_k[0].shape[2])
    new_k, new_v = list(cache_k), list(cache_v)

    def attend(i, q, k, v):
      new_k[i] = write_slots(cache_k[i], k, start)
      new_v[i] = write_slots(cache_v[i], v, start)
      q_mask = mask[:, :, -q.shape[2]:]  # the last block's queries are the last n_out rows
      if fresh:
        return attention.dense_attention(q, k, v, q_mask)
      return attention.dense_attention(q, new_k[i], new_v[i], q_mask)

    h, _ = self.run_blocks(x_BxWxD.astype(RESIDUAL_DTYPE), slot_BxW - pad_B[:, None], attend,
                           keep_last=n_out)
    return h, tuple(new_k), tuple(new_v)


def _positions(shape) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(shape[1]), shape)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """Shapes only; eager sharding off because logical names are not mesh axes."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def split_params(model: nnx.Module):
  """(graphdef, params as a plain nested dict): the pytree we optimise and checkpoint."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def with_unigram_head_bias(params: dict, counts_V: np.ndarray) -> dict:
  """`params` with the output bias set to log of the add-one-smoothed unigram frequencies
  (`counts_V`: count per id), placed on the bias's own sharding. With the zero-initialised head
  the model then starts at the unigram distribution (config train.head_bias_init)."""
  bias = params["head_bias"]
  if counts_V.shape != bias.shape:
    raise ValueError(f"counts of shape {counts_V.shape} for an output bias of shape {bias.shape}")
  counts = counts_V.astype(np.float64)
  log_p = np.log((counts + 1.0) / (counts.sum() + len(counts))).astype(np.float32)
  new = jax.make_array_from_callback(bias.shape, bias.sharding, lambda idx: log_p[idx])
  return {**params, "head_bias": new}


def merge(graphdef, params: dict) -> Transformer:
  return nnx.merge(graphdef, params)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
