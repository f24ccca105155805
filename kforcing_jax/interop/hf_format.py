"""Hugging Face Llama-family checkpoints <-> our parameter tree: the one mapping table.

Pure functions on numpy arrays (files are read and written in `hf_checkpoint.py`). Families:
Llama (also SmolLM, Llama-3 rope scaling), Mistral and Qwen2 (q/k/v biases). HF stores Linear
weights (out, in); ours are (in, out) and head-structured:

  HF name (layer i: model.layers.{i}.)       ours (blocks.{i}.)           transform
  model.embed_tokens.weight (V, d)           vocab_embed (V, d)           as is
  input_layernorm.weight (d,)                norm1.weight                 as is
  self_attn.{q,k,v}_proj.weight              attn_qkv (d, 3, H, K)        MHA: stack q, k, v
                                             attn_q (d, H, K),            GQA: q; stack k, v
                                             attn_kv (d, 2, G, K)
  self_attn.{q,k,v}_proj.bias (Qwen2)        attn_qkv_bias / attn_q_bias, attn_kv_bias
  self_attn.o_proj.weight (d, H*K)           attn_out (H, K, d)
  post_attention_layernorm.weight            norm2.weight
  mlp.gate_proj / up_proj / down_proj        mlp_gate (d, F) / mlp_in (d, F) / mlp_out (F, d)
  model.norm.weight                          norm_final.weight
  lm_head.weight (V, d), absent if tied      head (d, V)

GGUF files (llama.cpp) name the same tensors differently and store q/k rows permuted for
llama.cpp's interleaved rotary layout; `gguf_state` undoes both (as transformers' GGUF loader
does), so every source goes through this one table. Both rotary layouts are "rotate half" after
that, which is ours.
"""

import dataclasses

import numpy as np

from kforcing_jax.config import check as config_check
from kforcing_jax.model import transformer as model_lib

FAMILIES = ("llama", "mistral", "qwen2")


class UnsupportedModel(config_check.UserError):
  """A checkpoint this module cannot map; the message is one line naming what is unsupported."""


# ---- config.json <-> ModelConfig ----

def _rope(hf: dict) -> tuple[float, tuple]:
  """(base, our rope_scaling tuple) from either transformers' old (rope_theta, rope_scaling) or
  new (rope_parameters) spelling."""
  params = hf.get("rope_parameters") or {}
  base = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = hf.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind == "default":
    return base, ()
  if kind != "llama3":
    raise UnsupportedModel(f"rope scaling type {kind!r} is not supported (only 'llama3' and none)")
  return base, (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                float(scaling["original_max_position_embeddings"]))


def config_from_hf(hf: dict, dtype: str = "float32") -> model_lib.ModelConfig:
  """Our ModelConfig for a HF config.json dict; UnsupportedModel names what does not fit."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UnsupportedModel(f"model_type {family!r} is not supported (supported: "
                           f"{', '.join(FAMILIES)})")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModel(f"hidden_act {act!r} is not supported (Llama-family SwiGLU uses silu)")
  if hf.get("mlp_bias"):
    raise UnsupportedModel("mlp_bias=true is not supported")
  if family == "llama" and hf.get("attention_bias"):  # q/k/v AND o_proj biases
    raise UnsupportedModel("attention_bias=true (biases on q/k/v/o) is not supported for llama")
  qkv_bias = family == "qwen2"
  base, scaling = _rope(hf)
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // heads)
  return model_lib.ModelConfig(
      vocab_size=int(hf["vocab_size"]), mask_id=None, d_model=d,
      n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_size=0 if head_dim == d // heads else head_dim,
      mlp_hidden=int(hf["intermediate_size"]), rope_base=base, rope_scaling=scaling,
      norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
      head_bias=False, dtype=dtype).validate()


def config_to_hf(cfg: model_lib.ModelConfig, max_positions: int = 8192) -> dict:
  """A config.json dict transformers loads as the same architecture."""
  if cfg.norm != "rms" or cfg.mlp != "swiglu" or cfg.head_bias:
    raise UnsupportedModel("only Llama-family stages (norm=rms, mlp=swiglu, no head bias) export "
                           "to Hugging Face; the authors' architecture exports with --to_torch")
  family = "qwen2" if cfg.qkv_bias else "llama"
  out = {
      "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
      "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_width, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": max_positions, "torch_dtype": "float32",
  }
  if cfg.rope_scaling:
    factor, low, high, original = cfg.rope_scaling
    out["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                           "high_freq_factor": high,
                           "original_max_position_embeddings": int(original)}
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


# ---- the mapping table ----

@dataclasses.dataclass(frozen=True)
class Entry:
  """Our parameter `path` made from the HF tensors `names` by `to_ours`; `to_hf` inverts it."""
  path: tuple
  names: tuple
  to_ours: object  # (*hf arrays) -> our array
  to_hf: object  # our array -> tuple of hf arrays (same order as names)


def _heads_in(w, n):  # (n*K, d) -> (d, n, K)
  return w.T.reshape(w.shape[1], n, -1)


def _heads_out(a):  # (d, n, K) -> (n*K, d)
  return a.reshape(a.shape[0], -1).T


def mapping(cfg: model_lib.ModelConfig) -> list[Entry]:
  """The HF <-> ours table for `cfg` (one row per parameter of ours)."""
  h, g = cfg.n_heads, cfg.kv_heads
  same = lambda a: a
  one = lambda a: (a,)
  transpose = lambda a: a.T
  entries = [Entry(("vocab_embed",), ("model.embed_tokens.weight",), same, one),
             Entry(("norm_final", "weight"), ("model.norm.weight",), same, one)]
  if not cfg.tie_embeddings:
    entries.append(Entry(("head",), ("lm_head.weight",), transpose, lambda a: (a.T,)))
  for i in range(cfg.n_layers):
    hf = f"model.layers.{i}."
    att = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
    bias = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
    ours = lambda *p: ("blocks", i, *p)
    rows = [
        Entry(ours("norm1", "weight"), (hf + "input_layernorm.weight",), same, one),
        Entry(ours("norm2", "weight"), (hf + "post_attention_layernorm.weight",), same, one),
        Entry(ours("attn_out"), (hf + "self_attn.o_proj.weight",),
              lambda w: w.T.reshape(h, -1, w.shape[0]),
              lambda a: (a.reshape(-1, a.shape[-1]).T,)),
        Entry(ours("mlp_gate"), (hf + "mlp.gate_proj.weight",), transpose, lambda a: (a.T,)),
        Entry(ours("mlp_in"), (hf + "mlp.up_proj.weight",), transpose, lambda a: (a.T,)),
        Entry(ours("mlp_out"), (hf + "mlp.down_proj.weight",), transpose, lambda a: (a.T,)),
    ]
    if g == h:
      rows.append(Entry(ours("attn_qkv"), tuple(att),
                        lambda q, k, v: np.stack([_heads_in(x, h) for x in (q, k, v)], 1),
                        lambda a: tuple(_heads_out(a[:, j]) for j in range(3))))
      if cfg.qkv_bias:
        rows.append(Entry(ours("attn_qkv_bias"), tuple(bias),
                          lambda q, k, v: np.stack([x.reshape(h, -1) for x in (q, k, v)]),
                          lambda a: tuple(a[j].reshape(-1) for j in range(3))))
    else:
      rows += [Entry(ours("attn_q"), (att[0],), lambda q: _heads_in(q, h),
                     lambda a: (_heads_out(a),)),
               Entry(ours("attn_kv"), tuple(att[1:]),
                     lambda k, v: np.stack([_heads_in(x, g) for x in (k, v)], 1),
                     lambda a: (_heads_out(a[:, 0]), _heads_out(a[:, 1])))]
      if cfg.qkv_bias:
        rows += [Entry(ours("attn_q_bias"), (bias[0],), lambda q: q.reshape(h, -1),
                       lambda a: (a.reshape(-1),)),
                 Entry(ours("attn_kv_bias"), tuple(bias[1:]),
                       lambda k, v: np.stack([k.reshape(g, -1), v.reshape(g, -1)]),
                       lambda a: (a[0].reshape(-1), a[1].reshape(-1)))]
    entries += rows
  return entries


def expected_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple]:
  """HF name -> shape, for the shape check."""
  d, f, v, k = cfg.d_model, cfg.mlp_width, cfg.vocab_size, cfg.head_dim
  h, g = cfg.n_heads * k, cfg.kv_heads * k
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (h, d), p + "self_attn.k_proj.weight": (g, d),
        p + "self_attn.v_proj.weight": (g, d), p + "self_attn.o_proj.weight": (d, h),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f)})
    if cfg.qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (g,),
                     p + "self_attn.v_proj.bias": (g,)})
  return shapes


def check_state(state: dict, cfg: model_lib.ModelConfig) -> None:
  """Every tensor present with its shape; one error listing every problem."""
  want = expected_shapes(cfg)
  problems = [f"{n}: missing" for n in want if n not in state]
  problems += [f"{n}: shape {tuple(state[n].shape)}, expected {s}" for n, s in want.items()
               if n in state and tuple(state[n].shape) != s]
  # Tied models may still carry lm_head.weight equal to the embeddings; rotary buffers are derived.
  extra = [n for n in state if n not in want and not n.endswith("rotary_emb.inv_freq")
           and not (cfg.tie_embeddings and n == "lm_head.weight")]
  problems += [f"{n}: unexpected tensor" for n in extra]
  if problems:
    raise UnsupportedModel(f"{len(problems)} tensor problem(s): " + "; ".join(problems))


def from_hf(state: dict, cfg: model_lib.ModelConfig) -> dict:
  """Our nested params dict (float32 numpy) from a HF state dict (numpy arrays)."""
  check_state(state, cfg)
  params: dict = {}
  for e in mapping(cfg):
    node = params
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = np.ascontiguousarray(
        e.to_ours(*(np.asarray(state[n], np.float32) for n in e.names)), np.float32)
  return params


def to_hf(params: dict, cfg: model_lib.ModelConfig) -> dict:
  """The HF state dict (float32 numpy) of our params (the backbone and head only)."""
  out = {}
  for e in mapping(cfg):
    node = params
    for key in e.path:
      node = node[key]
    for name, value in zip(e.names, e.to_hf(np.asarray(node, np.float32))):
      out[name] = np.ascontiguousarray(value)
  return out


# ---- GGUF (llama.cpp) ----

_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def gguf_config(reader) -> dict:
  """A HF-style config dict from a GGUF file's metadata (llama-architecture files)."""
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "mistral"):
    raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported (supported: llama, "
                           "qwen2, mistral)")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
  names = {t.name for t in reader.tensors}
  cfg = {"model_type": "llama" if arch == "mistral" else arch, "vocab_size": int(vocab),
         "hidden_size": int(get("embedding_length")), "num_hidden_layers": int(get("block_count")),
         "num_attention_heads": int(get("attention.head_count")),
         "num_key_value_heads": int(get("attention.head_count_kv") or get("attention.head_count")),
         "intermediate_size": int(get("feed_forward_length")),
         "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
         "rope_theta": float(get("rope.freq_base", 10000.0)), "hidden_act": "silu",
         "tie_word_embeddings": "output.weight" not in names,
         "max_position_embeddings": int(get("context_length", 2048))}
  key_len = get("attention.key_length")
  if key_len:
    cfg["head_dim"] = int(key_len)
  if get("rope.scaling.type") not in (None, "none"):
    raise UnsupportedModel(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
  return cfg


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (its interleaved rotary -> HF's rotate-half)."""
  rows = w.shape[0]
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_state(reader, hf_cfg: dict) -> dict:
  """HF-named float32 state dict from a GGUF reader: every tensor dequantized (any type the
  `gguf` package dequantizes) and the llama q/k permutation undone."""
  from gguf import quants  # pylint: disable=import-outside-toplevel
  state = {}
  for t in reader.tensors:
    name = t.name
    if name in _GGUF_GLOBAL:
      hf_name = _GGUF_GLOBAL[name]
    elif name.startswith("blk."):
      _, i, kind, suffix = name.split(".", 3)
      if kind not in _GGUF_LAYER:
        raise UnsupportedModel(f"GGUF tensor {name!r} has no Llama-family counterpart")
      hf_name = f"model.layers.{i}.{_GGUF_LAYER[kind]}.{suffix}"
    elif name == "rope_freqs.weight":
      continue  # llama3 rope scaling factors; the config carries the scaling itself.
    else:
      raise UnsupportedModel(f"GGUF tensor {name!r} has no Llama-family counterpart")
    try:
      w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as e:
      raise UnsupportedModel(f"GGUF tensor {name!r}: quantization type "
                             f"{t.tensor_type.name} is not supported by the gguf package") from e
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first.
    w = w.reshape(shape)
    if hf_cfg["model_type"] == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = hf_cfg["num_attention_heads"] if "q_proj" in hf_name else hf_cfg[
          "num_key_value_heads"]
      w = _unpermute(w, heads)
    state[hf_name] = w
  return state
