"""PyTorch checkpoints <-> kforcing_jax work dirs (the logic behind `python -m
kforcing_jax.convert`). torch is imported lazily: the package itself never needs it.

Import (`from_torch`): a plain state dict, or a dict holding it under "state_dict" (Lightning)
or "model" (tensor names may carry a "backbone." / "model." / "module." prefix), and optionally
EMA weights ("ema" as a name -> tensor dict, or as {"shadow_params": [...]} listed in the
model's parameter order, the usual torch EMA helper format). The architecture is read from the
shapes (torch_format.py); the result is a params-only stage (`stage_io.save_params_stage`) that
generate / benchmark / evaluate load like a trained one.

Export (`to_torch`): a stage's params (EMA when saved) as a plain `.pt` state dict with the
reference names, plus a `.json` sidecar (model config, stage, window k, tokenizer, layouts) that
`from_torch` reads back, so an exported file re-imports without flags.
"""

import collections
import json
import os
import time

import ml_collections
import numpy as np

from kforcing_jax.config import check as config_check
from kforcing_jax.interop import torch_format
from kforcing_jax.training import stage_io
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.data import tokenizer as tokenizer_lib
from kforcing_jax.observe.metrics_log import log

TORCH_PIN = "torch==2.13.0"
SIDECAR_FORMAT = "kforcing-reference-state-dict-v1"
QKV_LAYOUT = ("attn_qkv.weight rows = [q; k; v], each d rows with heads contiguous "
              "(head h = rows h*head_dim..(h+1)*head_dim-1); PyTorch Linear weights are (out, in)")
PAPER_K = 4  # The authors' released PFLMs use window 4; the window is not in the weights.


def import_torch():
  """torch, or an ImportError saying how to install the CPU build."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"PyTorch checkpoint conversion needs torch: pip install {TORCH_PIN} "
                      "(the CPU build is enough; on PyPI CPU-only machines it installs as "
                      f"{TORCH_PIN}). Nothing else in kforcing_jax needs it.") from e
  return torch


def sidecar_path(pt_path: str) -> str:
  return os.path.splitext(pt_path)[0] + ".json"


def _to_numpy(tensor) -> np.ndarray:
  torch = import_torch()
  if not isinstance(tensor, torch.Tensor):
    return np.asarray(tensor)
  t = tensor.detach().cpu()
  return (t.to(torch.float32) if t.is_floating_point() else t).numpy()


def read_state_dict(path: str, use_ema: bool = True, unsafe_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], str]:
  """(prefix-free reference state dict as numpy, "ema" or "raw") from a torch checkpoint."""
  torch = import_torch()
  if not os.path.exists(path):
    raise FileNotFoundError(f"--from_torch {path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
  except Exception as e:  # weights_only refuses pickled configs (e.g. Lightning hparams).
    if unsafe_pickle:
      raise
    raise ValueError(f"torch.load({path!r}, weights_only=True) failed ({type(e).__name__}: "
                     f"{str(e)[:300]}). If the file comes from a source you trust (e.g. a "
                     "Lightning checkpoint with pickled hyper-parameters), rerun with "
                     "--unsafe_pickle.") from e
  if not isinstance(obj, dict):
    raise torch_format.LayoutError(f"{path} holds a {type(obj).__name__}, not a state dict")
  holder = next((key for key in ("state_dict", "model") if isinstance(obj.get(key), dict)), None)
  raw = obj[holder] if holder else obj
  raw = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
  raw, prefix = torch_format.strip_prefix(raw)
  if prefix:
    log.info("Stripped the prefix %r from the tensor names.", prefix)
  ema = _ema_tensors(obj, raw) if use_ema and holder else None
  if use_ema and ema is None:
    log.info("No EMA weights in %s; using the raw weights.", path)
  state = ema if ema is not None else raw
  return {k: _to_numpy(v) for k, v in state.items()}, ("ema" if ema is not None else "raw")


def _ema_tensors(obj: dict, raw: dict) -> dict | None:
  """EMA weights as a name -> tensor dict aligned with `raw`, or None when there are none."""
  for key in ("ema", "ema_state_dict", "state_dict_ema"):
    ema = obj.get(key)
    if ema is None:
      continue
    if isinstance(ema, dict) and "shadow_params" in ema:
      shadow = list(ema["shadow_params"])
      names = list(raw)  # Parameter order of the wrapped model = its state-dict order.
      if len(shadow) < len(names):
        raise torch_format.LayoutError(
            f"checkpoint[{key!r}]['shadow_params'] has {len(shadow)} tensors but the model has "
            f"{len(names)} ({names[len(shadow)] if shadow else names[0]} has no EMA value)")
      for name, tensor in zip(names, shadow):
        if tuple(tensor.shape) != tuple(raw[name].shape):
          raise torch_format.LayoutError(
              f"checkpoint[{key!r}]['shadow_params'] is not in the state-dict order: the entry "
              f"for {name} has shape {tuple(tensor.shape)}, expected {tuple(raw[name].shape)}")
      return dict(zip(names, shadow))
    if isinstance(ema, dict):
      ema, _ = torch_format.strip_prefix(ema)
      return ema
    raise torch_format.LayoutError(f"checkpoint[{key!r}] is a {type(ema).__name__}; expected a "
                                   "state dict or {'shadow_params': [...]}")
  return None


def from_torch(ckpt_path: str, workdir: str, n_heads: int | None = None,
               tokenizer: str | None = None, tokenizer_file: str | None = None,
               mask_id: int | None = None, k: int | None = None, use_ema: bool = True,
               dtype: str = "float32", ignore_extra: bool = False,
               unsafe_pickle: bool = False) -> str:
  """Convert a reference PyTorch checkpoint into a stage of `workdir`; returns the stage dir.

  A sidecar `<ckpt>.json` written by `to_torch` supplies defaults for n_heads, mask_id, k,
  rope_base and tokenizer, and the noise encoder's noise_max_freq. Without one: n_heads=12,
  k=4 and noise_max_freq=1 (the paper's models).
  """
  side = {}
  if os.path.exists(sidecar_path(ckpt_path)):
    with open(sidecar_path(ckpt_path), encoding="utf-8") as f:
      side = json.load(f)
    log.info("Read defaults from the sidecar %s.", sidecar_path(ckpt_path))
  side_cfg = side.get("model_config", {})
  n_heads = n_heads or side_cfg.get("n_heads", 12)
  mask_id = side_cfg.get("mask_id") if mask_id is None else mask_id
  fetch = tokenizer  # Download only when asked on the command line, never from the sidecar.
  tokenizer = tokenizer or side.get("tokenizer")
  if dtype not in config_check.DTYPES:
    raise ValueError(f"--dtype must be one of {config_check.DTYPES}, got {dtype!r}")

  start = time.perf_counter()
  log.info("Reading %s ...", ckpt_path)
  state, weights = read_state_dict(ckpt_path, use_ema, unsafe_pickle)
  tok = _read_tokenizer(tokenizer_file) if tokenizer_file else None
  if mask_id is None and tok is not None:
    mask_id = tok.mask_id
  state, rope_base = torch_format.take_rotary_buffer(state, n_heads, side_cfg.get("rope_base"))
  cfg, has_noise = torch_format.infer_config(state, n_heads, mask_id, tokenizer, rope_base)
  cfg = model_lib.ModelConfig(**{**cfg.__dict__, "dtype": dtype,
                                 "noise_max_freq": float(side_cfg.get("noise_max_freq", 1.0))})
  if has_noise:
    k = k or side.get("k") or PAPER_K
    stage = f"k{k}"
  else:
    if k:
      raise ValueError(f"--k={k} was given but the checkpoint has no noise_encoder.* tensors: "
                       "it is an AR model (stage 'teacher')")
    stage = config_check.TEACHER
  if ignore_extra:
    expected = torch_format.reference_shapes(cfg, has_noise)
    dropped = [name for name in state if name not in expected]
    if dropped:
      log.warning("Ignoring %d tensors not in the reference layout: %s", len(dropped),
                  ", ".join(dropped))
    state = {name: v for name, v in state.items() if name in expected}
  params = torch_format.from_reference(state, cfg, has_noise)
  n_params = sum(int(v.size) for v in state.values())

  stage_dir = os.path.join(stage_io.stages_dir(workdir), stage)
  if stage in stage_io.list_stages(workdir):
    raise FileExistsError(f"{stage_dir} already holds a checkpoint; convert into a fresh "
                          "--workdir (or delete that stage)")
  if tok is not None:
    _install_tokenizer(tok, cfg, workdir, tokenizer or "file", tokenizer_file)
  elif fetch:
    _fetch_tokenizer(fetch, cfg, workdir)
  log.info("Read %d tensors (%.1fs); writing the Orbax checkpoint ...", len(state),
           time.perf_counter() - start)
  meta = {"converted_from": os.path.abspath(ckpt_path), "weights": weights,
          "tokenizer": tokenizer, "qkv_layout": QKV_LAYOUT, "n_params": n_params}
  out = stage_io.save_params_stage(workdir, stage, params, cfg, step=0, extra_meta=meta)
  log.info("Wrote stage %r (%s weights, %.1fM params, %d layers, d=%d, %d heads, V=%d, "
           "mask_id=%d) to %s in %.1fs", stage, weights, n_params / 1e6, cfg.n_layers,
           cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.mask_id, out,
           time.perf_counter() - start)
  return out


def _read_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  """A local tokenizer.json; GPT-2's gets the extra [MASK] id as `data/tokenizer.py` does."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  hf = tokenizers.Tokenizer.from_file(path)
  if not any(hf.token_to_id(t) is not None for t in tokenizer_lib.MASK_TOKENS):
    hf.add_special_tokens([tokenizer_lib.MASK_TOKENS[0]])
  return tokenizer_lib.Tokenizer(hf)


def _check_tokenizer(tok: tokenizer_lib.Tokenizer, cfg: model_lib.ModelConfig) -> None:
  if tok.mask_id != cfg.mask_id:
    raise ValueError(f"the tokenizer's mask token has id {tok.mask_id} but the model's mask_id "
                     f"is {cfg.mask_id} (--mask_id); they must agree")
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the checkpoint's "
                     f"vocab_embed.embedding only {cfg.vocab_size} rows")


def _install_tokenizer(tok, cfg, workdir: str, name: str, source: str) -> None:
  _check_tokenizer(tok, cfg)
  os.makedirs(workdir, exist_ok=True)
  tok.save(os.path.join(workdir, stage_io.TOKENIZER_FILE))
  meta = {"tokenizer": name} if name in tokenizer_lib.KINDS else {"tokenizer": name,
                                                                  "source": source}
  with open(os.path.join(workdir, "tokenizer_meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f)


def _fetch_tokenizer(name: str, cfg, workdir: str) -> None:
  """Download (once) through the same code path training uses; offline, warn and go on."""
  if name not in tokenizer_lib.KINDS[1:]:
    raise ValueError(f"--tokenizer must be one of {tokenizer_lib.KINDS[1:]} (or give "
                     f"--tokenizer_file), got {name!r}")
  try:
    tok = tokenizer_lib.build_tokenizer(ml_collections.ConfigDict({"tokenizer": name}), workdir)
  except RuntimeError as e:
    log.warning("%s\nThe weights are converted, but generate needs <workdir>/tokenizer.json: "
                    "rerun with --tokenizer_file=PATH/tokenizer.json (e.g. from the HF hub "
                    "%s repo) into a fresh workdir, or copy it there.", e, name)
    return
  _check_tokenizer(tok, cfg)


def to_torch(workdir: str, out_path: str, stage: str | None = None,
             use_ema: bool = True) -> str:
  """Export a stage (default: the last of the chain) as a reference `.pt` + `.json` sidecar."""
  torch = import_torch()
  stages = stage_io.list_stages(workdir)
  if not stages:
    raise FileNotFoundError(f"no stage checkpoints under {stage_io.stages_dir(workdir)}")
  stage = stage or stages[-1]
  start = time.perf_counter()
  log.info("Loading stage %r of %s ...", stage, workdir)
  import jax  # pylint: disable=import-outside-toplevel
  from kforcing_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  loaded = stage_io.load_stage(workdir, stage, mesh=mesh, use_ema=use_ema, load_tokenizer=False)
  if loaded.model_cfg.attention != "causal":
    raise ValueError(f"stage {stage!r} is a {loaded.model_cfg.attention} (masked-diffusion) "
                     "model; the authors' layout holds causal models only")
  if loaded.k and loaded.model_cfg.noise_max_freq != 1.0:
    log.warning("This stage's noise encoder uses noise_max_freq=%g; the authors' model code "
                "assumes 1, so only kforcing_jax (reading the sidecar) decodes it correctly.",
                loaded.model_cfg.noise_max_freq)
  host = jax.tree.map(np.asarray, jax.device_get(loaded.params))
  ref = torch_format.to_reference(host, loaded.model_cfg)
  tensors = collections.OrderedDict(
      (name, torch.from_numpy(np.array(v))) for name, v in ref.items())
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  torch.save(tensors, out_path)
  tok_meta = os.path.join(workdir, "tokenizer_meta.json")
  tokenizer = loaded.meta.get("tokenizer")
  if tokenizer is None and os.path.exists(tok_meta):
    with open(tok_meta, encoding="utf-8") as f:
      tokenizer = json.load(f).get("tokenizer")
  side = {"format": SIDECAR_FORMAT, "stage": stage, "k": loaded.k, "step": loaded.step,
          "model_config": loaded.model_cfg.__dict__, "tokenizer": tokenizer,
          "weights": "ema if the stage saved EMA weights" if use_ema else "raw",
          "source_workdir": os.path.abspath(workdir), "qkv_layout": QKV_LAYOUT,
          "n_params": sum(int(v.size) for v in ref.values())}
  with open(sidecar_path(out_path), "w", encoding="utf-8") as f:
    json.dump(side, f, indent=2, sort_keys=True)
  log.info("Wrote %s (%d tensors, stage %s) and %s in %.1fs", out_path, len(tensors), stage,
           sidecar_path(out_path), time.perf_counter() - start)
  return out_path
