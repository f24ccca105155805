"""Prefix-conditioned parallel decoding of the masked-diffusion stage ('mdlm'): K tokens per pass.

The sequence is [prompt ; T masks] (prompts left-padded to a power-of-two bucket, as in
decode.py). Every pass runs the bidirectional backbone over the whole sequence
(`diffusion.mdlm.token_logits`), proposes a token at every masked position from its SUBS
distribution (mask never proposed, committed tokens carried over) and commits K of them:

  block   semi-autoregressive order: only the leftmost block of `block` positions that still
          holds masks is open (0: the whole continuation, commits anywhere);
  commit  which K open masks are committed: 'confidence' the K whose proposed token is most
          probable (top-K confidence, MaskGIT / LLaDA), 'greedy' the K leftmost (a left-to-right
          sweep), 'random' K in a random order drawn once per row (MDLM's ancestral sampler
          unmasks uniformly random positions).
  rerank  (confidence only) attention-discounted reranking in the spirit of ADAS: a proposal's
          confidence times (1 - a)^rerank, a = the share of its last-layer attention on
          positions still masked: a prediction that rests on unknowns waits (0: off).

Tokens are sampled under the sampling controls (temperature 0: argmax) with the inverse-CDF of
the uniform of their position in the row's stream (decode.uniforms: (seed, row)), so a row
decodes as it would alone; 'random' orders positions by the uniforms of a second stream.
Every pass commits the same number of tokens in every row, so the whole decode is one jitted
fori_loop of sum over blocks of ceil(block / K) passes. A pass recomputes every position: with
bidirectional attention the committed tokens' keys and values change as later masks are
filled, so no KV cache carries over between passes (exact), unlike decode.py.
"""

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from kforcing_jax.diffusion import mdlm as mdlm_lib
from kforcing_jax.distill import sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode

COMMITS = ("confidence", "greedy", "random")
ORDER_STREAM = 1  # decode.uniforms stream of the 'random' commit order


@dataclasses.dataclass(frozen=True)
class MdlmDecodeSpec(sampling.ControlFields):
  """Static settings of an MDLM decode (hashable: one program per spec, batch and bucket)."""
  k: int  # tokens committed per forward pass (K)
  max_new_tokens: int
  commit: str = "confidence"
  block: int = 0  # semi-autoregressive block length; 0 = the whole continuation
  rerank: float = 0.0  # attention discount exponent of the confidence rule (0 = off)
  tau: float = 1.0  # temperature of the proposals; 0 = argmax
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  eos_id: int | None = None  # completions are cut after the first EOS (None: never)
  fill_id: int = 0  # never written (Completion lengths cut the buffer); decode.Engine's field

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"MdlmDecodeSpec.k must be >= 1, got {self.k}")
    if self.max_new_tokens < 1:
      raise ValueError(f"MdlmDecodeSpec.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.commit not in COMMITS:
      raise ValueError(f"MdlmDecodeSpec.commit must be one of {COMMITS}, got {self.commit!r}")
    if self.rerank < 0 or (self.rerank and self.commit != "confidence"):
      raise ValueError(f"MdlmDecodeSpec.rerank must be >= 0 and only reranks commit="
                       f"'confidence', got {self.rerank} with commit={self.commit!r}")
    if self.block < 0:
      raise ValueError(f"MdlmDecodeSpec.block must be >= 0 (0 = no blocks), got {self.block}")
    sampling.check_controls(self.tau, self.top_k, self.top_p, self.min_p)

  @property
  def block_len(self) -> int:
    return min(self.block or self.max_new_tokens, self.max_new_tokens)

  @property
  def n_passes(self) -> int:
    """Forward passes: ceil(len / K) for each block (the last may be shorter)."""
    full, rest = divmod(self.max_new_tokens, self.block_len)
    return full * -(-self.block_len // self.k) + -(-rest // self.k)


def initial_tokens(prompt_BxP: jax.Array, max_new_tokens: int, mask_id: int) -> jax.Array:
  """[prompt ; max_new_tokens masks] (B, P + T)."""
  masks = jnp.full((prompt_BxP.shape[0], max_new_tokens), mask_id, prompt_BxP.dtype)
  return jnp.concatenate([prompt_BxP, masks], axis=1)


def propose(m: model_lib.Transformer, spec: MdlmDecodeSpec, x_BxL: jax.Array, pad_B: jax.Array,
            z_BxT: jax.Array):
  """One forward pass: (proposed tokens (B, T), their probability (B, T)) of the continuation,
  from the SUBS distribution (committed positions propose themselves with probability 1); the
  probability discounted by the attention on masked positions when spec.rerank."""
  t = spec.max_new_tokens
  mask_id = m.cfg.mask_id
  if spec.rerank:
    logits, mass_BxT = mdlm_lib.token_logits(m, x_BxL, pad_B, n_tokens=t,
                                             mass_to_BxL=x_BxL == mask_id)
  else:
    logits = mdlm_lib.token_logits(m, x_BxL, pad_B, n_tokens=t)
  logp_BxTxV = mdlm_lib.subs_log_probs(logits, x_BxL[:, -t:], mask_id)
  b, _, v = logp_BxTxV.shape
  flat = logp_BxTxV.reshape(b * t, v)
  y = spec.controls.sample(flat, None if spec.greedy else z_BxT.reshape(b * t))
  y_BxT = y.reshape(b, t).astype(x_BxL.dtype)
  conf_BxT = jnp.exp(jnp.take_along_axis(logp_BxTxV, y_BxT[..., None], axis=-1)[..., 0])
  if spec.rerank:
    conf_BxT = conf_BxT * jnp.clip(1.0 - mass_BxT, 0.0, 1.0) ** spec.rerank
  return y_BxT, conf_BxT


def commit_scores(spec: MdlmDecodeSpec, conf_BxT: jax.Array, order_BxT: jax.Array) -> jax.Array:
  """Higher = committed first: the proposal's probability, minus the position, or a random
  rank."""
  if spec.commit == "confidence":
    return conf_BxT
  if spec.commit == "greedy":
    return -jnp.broadcast_to(jnp.arange(conf_BxT.shape[1], dtype=jnp.float32), conf_BxT.shape)
  return -order_BxT


def open_positions(spec: MdlmDecodeSpec, masked_BxT: jax.Array) -> jax.Array:
  """Masked positions of each row's leftmost block that still holds a mask."""
  t = masked_BxT.shape[1]
  blk_T = jnp.arange(t) // spec.block_len
  first_B = jnp.min(jnp.where(masked_BxT, blk_T[None, :], t), axis=1)
  return masked_BxT & (blk_T[None, :] == first_B[:, None])


def decode_pass(m: model_lib.Transformer, spec: MdlmDecodeSpec, x_BxL: jax.Array,
                pad_B: jax.Array, z_BxT: jax.Array, order_BxT: jax.Array) -> jax.Array:
  """Commit K proposals (fewer if the open block has fewer masks): the updated sequence."""
  t = spec.max_new_tokens
  cont_BxT = x_BxL[:, -t:]
  y_BxT, conf_BxT = propose(m, spec, x_BxL, pad_B, z_BxT)
  eligible = open_positions(spec, cont_BxT == m.cfg.mask_id)
  score = jnp.where(eligible, commit_scores(spec, conf_BxT, order_BxT), -jnp.inf)
  _, idx_BxK = jax.lax.top_k(score, min(spec.k, t))
  pick_BxT = jnp.zeros_like(eligible).at[jnp.arange(x_BxL.shape[0])[:, None], idx_BxK].set(True)
  cont_BxT = jnp.where(pick_BxT & eligible, y_BxT, cont_BxT)
  return x_BxL.at[:, -t:].set(cont_BxT)


def generate(m: model_lib.Transformer, spec: MdlmDecodeSpec, prompt_BxP: jax.Array,
             pad_B: jax.Array, keys_Bx2: jax.Array):
  """The whole decode as one fori_loop: (tokens (B, T), lengths (B,): up to the first EOS)."""
  t = spec.max_new_tokens
  z_BxT = decode.uniforms(keys_Bx2, 0, t)
  order_BxT = decode.uniforms(keys_Bx2, 0, t, stream=ORDER_STREAM)
  x = initial_tokens(prompt_BxP, t, m.cfg.mask_id)
  x = jax.lax.fori_loop(0, spec.n_passes,
                        lambda _, x: decode_pass(m, spec, x, pad_B, z_BxT, order_BxT), x)
  tokens_BxT = x[:, -t:]
  if spec.eos_id is None:
    return tokens_BxT, jnp.full((x.shape[0],), t, jnp.int32)
  is_eos = tokens_BxT == spec.eos_id
  first = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, t)
  return tokens_BxT, first.astype(jnp.int32)


class MdlmEngine(decode.Engine):
  """decode.Engine's batching, prompt padding and per-row streams around the MDLM decode:
  engine = MdlmEngine.from_stage(stage_io.load_stage(workdir, "mdlm"))
  outs = engine.generate([[eos, 12, 7]], MdlmDecodeSpec(k=4, max_new_tokens=64))"""

  def check(self, spec) -> None:
    if not isinstance(spec, MdlmDecodeSpec):
      raise ValueError("an mdlm stage decodes with an MdlmDecodeSpec (method 'mdlm')")
    if self.cfg.attention != "bidirectional" or self.cfg.mask_id is None:
      raise ValueError("MdlmEngine needs the masked-diffusion stage ('mdlm'): a bidirectional "
                       "model with a mask id")

  def _program(self, kind: str, spec, batch: int, plen: int, n_steps: int = 0):
    if kind != "generate":
      raise ValueError(f"the mdlm decoder has no {kind!r} program: every token may change until "
                       "the last pass, so it neither prefills a cache nor streams")
    key = (kind, spec, batch, plen)
    if key not in self._programs:
      gd, mesh = self.graphdef, self.mesh
      d1, d2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
      opts = decode.compiler_options(mesh.devices.flat[0].platform,
                                     batch // self.data_size * (plen + spec.max_new_tokens),
                                     decode.weight_bytes(self.params))
      self._programs[key] = jax.jit(
          lambda p, x, pad, keys: generate(model_lib.merge(gd, p), spec, x, pad, keys),
          in_shardings=(self._param_sh, d2, d1, d2), out_shardings=(d2, d1),
          compiler_options=opts)
    return self._programs[key]

  def stream(self, prompts: Sequence[Sequence[int]], spec, seed: int = 0,
             row_ids: Sequence[int] | None = None) -> Iterator:
    raise ValueError("the mdlm decoder does not stream: every token may change until the last "
                     "pass; use generate")
