"""The reference PyTorch parameter format (spec section 2) and its mapping to ours. numpy only.

Reference names and shapes (PyTorch Linear weights are (out, in)); d = width, F = MLP width,
V = vocabulary:
  vocab_embed.embedding                 (V, d)
  blocks.{i}.norm1.weight               (d,)      blocks.{i}.norm2.weight (d,)
  blocks.{i}.attn_qkv.weight            (3d, d)   no bias
  blocks.{i}.attn_out.weight            (d, d)    no bias
  blocks.{i}.mlp.0.weight / .bias       (F, d) / (F,)
  blocks.{i}.mlp.2.weight / .bias       (d, F) / (d,)
  output_layer.norm_final.weight        (d,)
  output_layer.linear.weight / .bias    (V, d) / (V,)
  PFLM only (noise encoder, MLP width fixed at 4d):
  noise_encoder.combined_proj.weight / .bias   (d, 2d) / (d,)
  noise_encoder.norm.weight / .bias            (d,) / (d,)
  noise_encoder.mlp.0.weight / .bias           (4d, d) / (4d,)
  noise_encoder.mlp.2.weight / .bias           (d, 4d) / (d,)

ASSUMPTION a real checkpoint depends on (not checkable from shapes): the fused qkv rows are
[q; k; v], each d rows, and inside each the heads are contiguous: head h of q is rows
h*K .. h*K+K-1 (K = d / n_heads = 64 in the paper), i.e. the `rearrange(qkv, 'b s (three h d)
-> b s three h d')` layout; attn_out's input columns follow the same (head, head_dim) order.
n_heads itself is not stored in the weights; the paper's models use 12 (head_dim 64).

Our layout (layers.py, sharding.py): kernels are (in, out) and head-structured:
attn_qkv (d, 3, H, K), attn_out (H, K, d), mlp_in (d, F), head (d, V) + head_bias (V,).
"""

import collections
import re

import numpy as np

from kforcing_jax.config import check as config_check
from kforcing_jax.data import tokenizer as tokenizer_lib
from kforcing_jax.model import transformer as model_lib

NOISE_PREFIX = "noise_encoder."
# Prefixes that wrappers put in front of the reference names (Lightning module attribute,
# DataParallel, torch.compile); stripped when every tensor of the model carries one.
KNOWN_PREFIXES = ("backbone.", "model.", "module.", "_orig_mod.", "net.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


class LayoutError(config_check.UserError):
  """The state dict is not the reference layout; the message names the offending tensors."""


def reference_shapes(cfg: model_lib.ModelConfig, noise_encoder: bool) -> dict[str, tuple]:
  """Every tensor the reference model of `cfg` holds, name -> shape, in registration order."""
  d, f, v = cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size
  shapes = {"vocab_embed.embedding": (v, d)}
  for i in range(cfg.n_layers):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "attn_qkv.weight": (3 * d, d),
                   b + "attn_out.weight": (d, d), b + "norm2.weight": (d,),
                   b + "mlp.0.weight": (f, d), b + "mlp.0.bias": (f,),
                   b + "mlp.2.weight": (d, f), b + "mlp.2.bias": (d,)})
  shapes.update({"output_layer.norm_final.weight": (d,), "output_layer.linear.weight": (v, d),
                 "output_layer.linear.bias": (v,)})
  if noise_encoder:
    n = NOISE_PREFIX
    shapes.update({n + "combined_proj.weight": (d, 2 * d), n + "combined_proj.bias": (d,),
                   n + "norm.weight": (d,), n + "norm.bias": (d,),
                   n + "mlp.0.weight": (4 * d, d), n + "mlp.0.bias": (4 * d,),
                   n + "mlp.2.weight": (d, 4 * d), n + "mlp.2.bias": (d,)})
  return shapes


def strip_prefix(state: dict) -> tuple[dict, str]:
  """Drop a wrapper prefix such as "backbone." (returns the dict and the prefix removed).

  Keys outside the prefix (e.g. a Lightning module's noise schedule) are dropped with it.
  """
  if "vocab_embed.embedding" in state:
    return dict(state), ""
  for key in state:
    if key.endswith("vocab_embed.embedding"):
      prefix = key[:-len("vocab_embed.embedding")]
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix
  sample = ", ".join(list(state)[:8]) or "none"
  raise LayoutError(
      "unknown layout: no tensor named 'vocab_embed.embedding' (with or without a prefix such "
      f"as {', '.join(KNOWN_PREFIXES)}), so this is not a K-Forcing reference checkpoint; "
      f"{len(state)} tensors, first: {sample}")


ROTARY_BUFFER = "rotary_emb.inv_freq"  # persistent buffer of the authors' model: in every save


def take_rotary_buffer(state: dict, n_heads: int, rope_base: float | None) -> tuple[dict, float]:
  """(state without rotary buffers, rope_base) for a prefix-free state dict.

  The authors' model registers its rotary table 1 / base^(2i / head_dim) as a persistent buffer,
  so their state dicts hold `rotary_emb.inv_freq` (possibly once per block). It carries no
  weights, but it pins head_dim and the base: both are checked (head_dim = d_model / n_heads)
  and the base is read from it unless `rope_base` is given, which it must then agree with.
  """
  names = [k for k in state if k == ROTARY_BUFFER or k.endswith("." + ROTARY_BUFFER)]
  rest = {k: v for k, v in state.items() if k not in names}
  if not names:
    return rest, 10000.0 if rope_base is None else rope_base
  emb = state.get("vocab_embed.embedding")
  d = int(emb.shape[1]) if emb is not None and len(emb.shape) == 2 else None
  found = None
  for name in names:
    inv = np.asarray(state[name], np.float64).reshape(-1)
    if d is not None and n_heads >= 1 and d % n_heads == 0 and inv.size * 2 != d // n_heads:
      raise LayoutError(
          f"{name} has {inv.size} entries, so head_dim = {2 * inv.size} and n_heads = "
          f"{d // (2 * inv.size) if d % (2 * inv.size) == 0 else '?'} for d_model={d}; "
          f"--n_heads={n_heads} gives head_dim {d // n_heads}. Pass the right --n_heads.")
    if inv.size < 2 or not np.all(inv > 0):
      raise LayoutError(f"{name} is not a rotary table 1/base^(2i/head_dim): {inv[:4]}")
    head_dim = 2 * inv.size
    base = float(inv[1] ** (-head_dim / 2.0))
    want = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not np.allclose(inv, want, rtol=1e-4, atol=0):
      raise LayoutError(f"{name} is not a rotary table 1/base^(2i/head_dim) for any base")
    if found is not None and not np.isclose(base, found, rtol=1e-4):
      raise LayoutError(f"rotary buffers disagree: bases {found:g} and {base:g}")
    found = base
  base = float(round(found)) if abs(found - round(found)) < 1e-4 * found else found
  if rope_base is not None and not np.isclose(rope_base, base, rtol=1e-4):
    raise LayoutError(f"{names[0]} says rope_base={base:g}, but the sidecar says "
                      f"rope_base={rope_base:g}; they must agree")
  return rest, base


def infer_config(state: dict, n_heads: int, mask_id: int | None = None,
                 tokenizer: str | None = None, rope_base: float = 10000.0
                 ) -> tuple[model_lib.ModelConfig, bool]:
  """(ModelConfig, has_noise_encoder) from the tensor shapes of a prefix-free state dict.

  Layers = distinct blocks.{i}; d and V from vocab_embed.embedding; MLP width from
  blocks.0.mlp.0.weight; a noise encoder when any noise_encoder.* tensor is present. The
  PFLM's window k and n_heads are NOT in the weights (the caller supplies them).
  """
  emb = state.get("vocab_embed.embedding")
  if emb is None or len(emb.shape) != 2:
    raise LayoutError("unknown layout: tensor 'vocab_embed.embedding' must exist with shape "
                      f"(V, d), got {None if emb is None else tuple(emb.shape)}")
  vocab, d = (int(s) for s in emb.shape)
  layers = sorted({int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))})
  if not layers:
    raise LayoutError("unknown layout: no tensors named 'blocks.{i}.*' (transformer blocks)")
  if layers != list(range(len(layers))):
    raise LayoutError(f"blocks are not numbered 0..{len(layers) - 1}: found blocks {layers}")
  mlp = state.get("blocks.0.mlp.0.weight")
  if mlp is None or len(mlp.shape) != 2 or mlp.shape[1] != d or mlp.shape[0] % d:
    raise LayoutError("tensor 'blocks.0.mlp.0.weight' must exist with shape (r*d, d) for "
                      f"d={d}, got {None if mlp is None else tuple(mlp.shape)}")
  if n_heads < 1 or d % n_heads or (d // n_heads) % 2:
    raise LayoutError(f"--n_heads={n_heads} must divide d_model={d} into an even head_dim "
                      "(the paper's models: 12 heads of 64)")
  if mask_id is None:
    mask_id = default_mask_id(vocab, tokenizer)
  if not 0 <= mask_id < vocab:
    raise LayoutError(f"mask_id={mask_id} is outside the vocabulary (V={vocab}, from "
                      "'vocab_embed.embedding')")
  cfg = model_lib.ModelConfig(vocab_size=vocab, mask_id=int(mask_id), d_model=d,
                              n_layers=len(layers), n_heads=n_heads,
                              mlp_ratio=int(mlp.shape[0]) // d, rope_base=rope_base)
  return cfg, any(k.startswith(NOISE_PREFIX) for k in state)


def default_mask_id(vocab_size: int, tokenizer: str | None) -> int:
  """The reserved mask id of the authors' checkpoints: [MASK] = 103 for bert-base-uncased
  (LM1B, V = 30522), the appended id 50257 for GPT-2 (OWT, V = 50258); else the last id."""
  bert_vocab, bert_mask = tokenizer_lib.KNOWN_SIZES["bert-base-uncased"]
  if tokenizer == "bert-base-uncased" or (tokenizer is None and vocab_size == bert_vocab):
    return bert_mask
  return vocab_size - 1


def check_tensors(state: dict, expected: dict[str, tuple]) -> None:
  """Raise LayoutError listing every missing, extra and wrongly shaped tensor."""
  missing = [k for k in expected if k not in state]
  extra = [k for k in state if k not in expected]
  wrong = [f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
           for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
  if missing or extra or wrong:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)}: {', '.join(missing)}")
    if extra:
      parts.append(f"unexpected {len(extra)}: {', '.join(extra)}")
    if wrong:
      parts.append(f"wrong shape {len(wrong)}: {'; '.join(wrong)}")
    raise LayoutError("state dict does not match the reference layout -- " + " | ".join(parts))


def from_reference(state: dict, cfg: model_lib.ModelConfig, noise_encoder: bool) -> dict:
  """Reference state dict (numpy, prefix-free) -> our params pytree (numpy float32)."""
  check_tensors(state, reference_shapes(cfg, noise_encoder))
  d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
  g = lambda name: np.asarray(state[name], np.float32)
  params = {"vocab_embed": g("vocab_embed.embedding"), "blocks": {},
            "norm_final": {"weight": g("output_layer.norm_final.weight")},
            "head": g("output_layer.linear.weight").T.copy(),
            "head_bias": g("output_layer.linear.bias")}
  for i in range(cfg.n_layers):
    b = f"blocks.{i}."
    params["blocks"][i] = {
        "norm1": {"weight": g(b + "norm1.weight")},
        # (3d, d) rows [q; k; v] x (head, head_dim) -> (d, 3, H, K).
        "attn_qkv": g(b + "attn_qkv.weight").T.reshape(d, 3, h, k).copy(),
        # (d_out, d_in) with d_in = (head, head_dim) -> (H, K, d_out).
        "attn_out": g(b + "attn_out.weight").T.reshape(h, k, d).copy(),
        "norm2": {"weight": g(b + "norm2.weight")},
        "mlp_in": g(b + "mlp.0.weight").T.copy(), "mlp_in_bias": g(b + "mlp.0.bias"),
        "mlp_out": g(b + "mlp.2.weight").T.copy(), "mlp_out_bias": g(b + "mlp.2.bias")}
  if noise_encoder:
    n = NOISE_PREFIX
    params["noise_encoder"] = {
        "combined_proj": g(n + "combined_proj.weight").T.copy(),
        "combined_proj_bias": g(n + "combined_proj.bias"),
        "norm_weight": g(n + "norm.weight"), "norm_bias": g(n + "norm.bias"),
        "mlp_in": g(n + "mlp.0.weight").T.copy(), "mlp_in_bias": g(n + "mlp.0.bias"),
        "mlp_out": g(n + "mlp.2.weight").T.copy(), "mlp_out_bias": g(n + "mlp.2.bias")}
  return params


def to_reference(params: dict, cfg: model_lib.ModelConfig) -> "collections.OrderedDict":
  """Our params pytree -> reference state dict (name -> numpy float32, (out, in) weights)."""
  p = lambda x: np.asarray(x, np.float32)
  d = cfg.d_model
  out = collections.OrderedDict()
  out["vocab_embed.embedding"] = p(params["vocab_embed"])
  for i in range(cfg.n_layers):
    blk, b = params["blocks"][i], f"blocks.{i}."
    out[b + "norm1.weight"] = p(blk["norm1"]["weight"])
    out[b + "attn_qkv.weight"] = p(blk["attn_qkv"]).reshape(d, 3 * d).T.copy()
    out[b + "attn_out.weight"] = p(blk["attn_out"]).reshape(d, d).T.copy()
    out[b + "norm2.weight"] = p(blk["norm2"]["weight"])
    out[b + "mlp.0.weight"] = p(blk["mlp_in"]).T.copy()
    out[b + "mlp.0.bias"] = p(blk["mlp_in_bias"])
    out[b + "mlp.2.weight"] = p(blk["mlp_out"]).T.copy()
    out[b + "mlp.2.bias"] = p(blk["mlp_out_bias"])
  out["output_layer.norm_final.weight"] = p(params["norm_final"]["weight"])
  out["output_layer.linear.weight"] = p(params["head"]).T.copy()
  out["output_layer.linear.bias"] = p(params["head_bias"])
  if "noise_encoder" in params:
    ne, n = params["noise_encoder"], NOISE_PREFIX
    out[n + "combined_proj.weight"] = p(ne["combined_proj"]).T.copy()
    out[n + "combined_proj.bias"] = p(ne["combined_proj_bias"])
    out[n + "norm.weight"] = p(ne["norm_weight"])
    out[n + "norm.bias"] = p(ne["norm_bias"])
    out[n + "mlp.0.weight"] = p(ne["mlp_in"]).T.copy()
    out[n + "mlp.0.bias"] = p(ne["mlp_in_bias"])
    out[n + "mlp.2.weight"] = p(ne["mlp_out"]).T.copy()
    out[n + "mlp.2.bias"] = p(ne["mlp_out_bias"])
  check_tensors(out, reference_shapes(cfg, "noise_encoder" in params))
  return out
