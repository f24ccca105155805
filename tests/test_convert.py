"""PyTorch <-> kforcing_jax conversion: bit-exact round trips, logit parity with an independent
PyTorch forward written from the spec (tests/torch_reference.py), and the error messages."""

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402  (tests/ is not a package; see platform-notes)

from kforcing_jax.parallel import sharding
from kforcing_jax.interop import torch_checkpoint, torch_format  # noqa: E402
from kforcing_jax.training import stage_io  # noqa: E402
from kforcing_jax.model import transformer as model_lib  # noqa: E402
from kforcing_jax.model import pflm as pflm_lib  # noqa: E402

V, D, LAYERS, HEADS, MASK = 61, 64, 2, 2, 60  # head_dim 32: the converter is not tied to 64.
CFG = model_lib.ModelConfig(vocab_size=V, mask_id=MASK, d_model=D, n_layers=LAYERS,
                            n_heads=HEADS)
TOL = 2e-5  # float32; measured max |diff| ~2e-6 on logits of magnitude ~5.


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _one_device():
  """One-device mesh: the PFLM parity test compiles 2 functions; 8-way SPMD compiles slower."""
  return sharding.make_mesh(1, 1, jax.devices()[:1])


def _ref_model(pflm: bool, seed: int):
  cls = torch_reference.RefPFLM if pflm else torch_reference.RefAR
  m = cls(V, D, LAYERS, HEADS, MASK)
  torch_reference.randomize_(m, seed)
  return m.eval()


def _save_lightning(path, state, ema=None):
  """Lightning-style file: {"state_dict": {"backbone.<name>": ...}, "ema": ...}."""
  obj = {"state_dict": {"backbone." + k: v for k, v in state.items()}, "epoch": 3}
  if ema is not None:
    obj["ema"] = ema
  torch.save(obj, path)


def _our_random_params(pflm: bool, seed: int) -> dict:
  """A random model in our format; every leaf perturbed so no tensor is a constant."""
  with nnx.use_eager_sharding(False):
    module = (pflm_lib.PFLM if pflm else model_lib.Transformer)(CFG, nnx.Rngs(seed))
  _, params = model_lib.split_params(module)
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles.
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32),
                      params)


@pytest.mark.parametrize("pflm", [False, True])
def test_round_trip_ours_to_torch_and_back_is_bit_identical(tmp_path, pflm):
  params = _our_random_params(pflm, seed=1)
  stage = "k2" if pflm else "teacher"
  stage_io.save_params_stage(str(tmp_path / "a"), stage, params, CFG)
  pt = str(tmp_path / "export.pt")
  torch_checkpoint.to_torch(str(tmp_path / "a"), pt)

  exported = torch.load(pt, weights_only=True)
  # Names and shapes are exactly those of the independent reference module.
  ref = _ref_model(pflm, 0).state_dict()
  assert list(exported) == list(ref)
  assert {k: tuple(v.shape) for k, v in exported.items()} == {
      k: tuple(v.shape) for k, v in ref.items()}
  side = json.load(open(torch_checkpoint.sidecar_path(pt)))
  assert side["stage"] == stage and side["model_config"]["n_heads"] == HEADS

  # Back, with no flags: n_heads, mask_id and k come from the sidecar.
  torch_checkpoint.from_torch(pt, str(tmp_path / "b"))
  got = stage_io.load_stage(str(tmp_path / "b"), stage, load_tokenizer=False)
  jax.tree.map(np.testing.assert_array_equal, _host(got.params), _host(params))
  assert got.model_cfg == CFG and got.k == (2 if pflm else 0)


def test_noise_max_freq_travels_in_the_sidecar(tmp_path):
  """The reference layout has no place for the encoder's frequency scale: the sidecar keeps it,
  and without a sidecar the authors' value (1) applies."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "noise_max_freq": 100.0})
  stage_io.save_params_stage(str(tmp_path / "a"), "k2", _our_random_params(True, 3), cfg)
  pt = str(tmp_path / "export.pt")
  torch_checkpoint.to_torch(str(tmp_path / "a"), pt)
  torch_checkpoint.from_torch(pt, str(tmp_path / "b"))
  assert stage_io.load_stage(str(tmp_path / "b"), "k2", load_tokenizer=False).model_cfg == cfg
  os.remove(torch_checkpoint.sidecar_path(pt))
  torch_checkpoint.from_torch(pt, str(tmp_path / "c"), n_heads=HEADS, mask_id=MASK, k=2)
  got = stage_io.load_stage(str(tmp_path / "c"), "k2", load_tokenizer=False).model_cfg
  assert got.noise_max_freq == 1.0


def test_round_trip_torch_to_ours_and_back_is_bit_identical(tmp_path):
  state = _ref_model(True, seed=2).state_dict()
  _save_lightning(tmp_path / "ref.ckpt", state)
  torch_checkpoint.from_torch(str(tmp_path / "ref.ckpt"), str(tmp_path / "w"), n_heads=HEADS,
                              mask_id=MASK, k=2)
  torch_checkpoint.to_torch(str(tmp_path / "w"), str(tmp_path / "back.pt"))
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert list(back) == list(state)
  for name, tensor in state.items():
    assert torch.equal(back[name], tensor), name


def _tokens(seed, b, n):
  return np.random.default_rng(seed).integers(0, V, (b, n)).astype(np.int32)


def test_parity_ar_logits_match_independent_torch_forward(tmp_path):
  ref = _ref_model(False, seed=3)
  _save_lightning(tmp_path / "ar.ckpt", ref.state_dict())
  torch_checkpoint.from_torch(str(tmp_path / "ar.ckpt"), str(tmp_path / "w"), n_heads=HEADS)
  loaded = stage_io.load_stage(str(tmp_path / "w"), "teacher", load_tokenizer=False)
  assert len(loaded.mesh.devices.flat) == 8  # The serving default: all devices, data-parallel.
  assert loaded.model_cfg.mask_id == V - 1 and loaded.k == 0
  forward = jax.jit(lambda params, t: model_lib.merge(loaded.graphdef, params)(t))
  tokens = _tokens(0, 4, 12)
  got = np.asarray(forward(loaded.params, jnp.asarray(tokens)))
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens).long()).numpy()
  assert np.abs(want).max() > 1.0  # Non-trivial logits.
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_parity_pflm_two_stream_and_decode_prefill(tmp_path):
  ref = _ref_model(True, seed=4)
  _save_lightning(tmp_path / "pflm.ckpt", ref.state_dict())
  torch_checkpoint.from_torch(str(tmp_path / "pflm.ckpt"), str(tmp_path / "w"), n_heads=HEADS)
  loaded = stage_io.load_stage(str(tmp_path / "w"), "k4", mesh=_one_device(),
                               load_tokenizer=False)
  assert loaded.k == 4 and loaded.meta["weights"] == "raw"
  b, n, k = 4, 8, 4

  @jax.jit
  def two_stream(params, tokens_BxN, z_BxNxK):
    return model_lib.merge(loaded.graphdef, params).noise_logits(tokens_BxN, z_BxNxK)

  @jax.jit
  def prefill(params, tokens_BxN, z_BxK):
    """Decode prefill [prompt ; k noise] through the KV-cache path."""
    model = model_lib.merge(loaded.graphdef, params)
    x = jnp.concatenate([model.embed(tokens_BxN), model.noise_encoder(z_BxK)], axis=1)
    ck, cv = model_lib.init_cache(loaded.model_cfg, b, n + k)
    h, _, _ = model.forward_cached(x, ck, cv, 0, fresh=True)
    return model.logits(h[:, n:])

  tokens = _tokens(1, b, n)
  for draw in range(2):
    z = np.random.default_rng(10 + draw).random((b, n, k)).astype(np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(tokens).long(), torch.from_numpy(z)).numpy()
    assert np.abs(want).max() > 1.0
    # The efficient window attention (test_pflm checks it against our own dense path).
    got = np.asarray(two_stream(loaded.params, tokens, z))
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    # The prefill's k outputs = the window of the last context position t = n - 1.
    got = np.asarray(prefill(loaded.params, tokens, z[:, -1]))
    np.testing.assert_allclose(got, want[:, -1], rtol=TOL, atol=TOL)


def test_converted_pflm_decodes_like_a_torch_rollout(tmp_path):
  """End to end: the engine's k-token decoding (decode.generate, KV cache, 2k-position steps)
  of a converted checkpoint = argmax rollout of the independent torch forward, same uniforms."""
  from kforcing_jax.serving import decode
  ref = _ref_model(True, seed=9)
  torch.save(ref.state_dict(), tmp_path / "dec.pt")
  torch_checkpoint.from_torch(str(tmp_path / "dec.pt"), str(tmp_path / "w"), n_heads=HEADS)
  loaded = stage_io.load_stage(str(tmp_path / "w"), "k4", mesh=_one_device(),
                               load_tokenizer=False)
  b, n, k, blocks = 3, 6, 4, 3
  spec = decode.DecodeSpec(k=k, max_new_tokens=k * blocks)
  prompt = _tokens(2, b, n)
  keys = decode.row_keys(0, range(b))
  run = jax.jit(lambda params, p, pad, kd: decode.generate(
      model_lib.merge(loaded.graphdef, params), spec, p, pad, kd))
  got, _ = run(loaded.params, prompt, np.zeros((b,), np.int32), keys)

  x = torch.from_numpy(prompt).long()
  for j in range(blocks):
    z = np.asarray(decode.uniforms(jnp.asarray(keys), j * k, k))  # (B, k)
    z_all = np.broadcast_to(z[:, None, :], (b, x.shape[1], k)).copy()
    with torch.no_grad():
      y = ref(x, torch.from_numpy(z_all))[:, -1].argmax(-1)  # window of the last position
    x = torch.cat([x, y], dim=1)
  np.testing.assert_array_equal(np.asarray(got), x[:, n:].numpy())


def test_ema_weights_chosen_by_flag(tmp_path):
  ref = _ref_model(False, seed=5)
  state = ref.state_dict()
  shadow = [v + 1.0 for v in state.values()]  # Parameter order = state-dict order.
  _save_lightning(tmp_path / "ema.ckpt", state, ema={"shadow_params": shadow, "decay": 0.999})
  for use_ema, offset in ((True, 1.0), (False, 0.0)):
    workdir = str(tmp_path / f"w{use_ema}")
    torch_checkpoint.from_torch(str(tmp_path / "ema.ckpt"), workdir, n_heads=HEADS,
                                use_ema=use_ema)
    got = stage_io.load_stage(workdir, "teacher", load_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(got.params["vocab_embed"]),
                                  state["vocab_embed.embedding"].numpy() + offset)
    assert got.meta["weights"] == ("ema" if use_ema else "raw")
  # A name -> tensor EMA dict works too; shadow params in the wrong order fail by name.
  torch.save({"state_dict": state, "ema": {k: v * 2 for k, v in state.items()}},
             tmp_path / "ema_dict.ckpt")
  torch_checkpoint.from_torch(str(tmp_path / "ema_dict.ckpt"), str(tmp_path / "wd"),
                              n_heads=HEADS)
  got = stage_io.load_stage(str(tmp_path / "wd"), "teacher", load_tokenizer=False)
  np.testing.assert_array_equal(np.asarray(got.params["head_bias"]),
                                state["output_layer.linear.bias"].numpy() * 2)
  _save_lightning(tmp_path / "bad.ckpt", state, ema={"shadow_params": shadow[::-1]})
  with pytest.raises(torch_format.LayoutError, match="vocab_embed.embedding has shape"):
    torch_checkpoint.from_torch(str(tmp_path / "bad.ckpt"), str(tmp_path / "wb"),
                                n_heads=HEADS)


def _convert_state(tmp_path, state, name="x.pt", **kw):
  torch.save(state, tmp_path / name)
  kw.setdefault("n_heads", HEADS)
  return torch_checkpoint.from_torch(str(tmp_path / name), str(tmp_path / ("w_" + name)), **kw)


def test_errors_name_the_tensor(tmp_path):
  state = _ref_model(True, seed=6).state_dict()
  missing = {k: v for k, v in state.items() if k != "blocks.1.attn_out.weight"}
  with pytest.raises(torch_format.LayoutError, match=r"missing 1: blocks\.1\.attn_out\.weight"):
    _convert_state(tmp_path, missing, "missing.pt")
  wrong = dict(state, **{"noise_encoder.norm.bias": torch.zeros(D + 1)})
  with pytest.raises(torch_format.LayoutError,
                     match=r"noise_encoder\.norm\.bias: expected \(64,\), got \(65,\)"):
    _convert_state(tmp_path, wrong, "wrong.pt")
  extra = dict(state, **{"blocks.0.rotary.inv_freq": torch.zeros(16)})
  with pytest.raises(torch_format.LayoutError, match=r"unexpected 1: blocks\.0\.rotary"):
    _convert_state(tmp_path, extra, "extra.pt")
  _convert_state(tmp_path, extra, "extra_ok.pt", ignore_extra=True)  # Opt-in: dropped.
  gpt2_like = {"transformer.wte.weight": torch.zeros(V, D), "lm_head.weight": torch.zeros(V, D)}
  with pytest.raises(torch_format.LayoutError,
                     match=r"unknown layout: no tensor named 'vocab_embed\.embedding'.*wte"):
    _convert_state(tmp_path, gpt2_like, "gpt2.pt")
  with pytest.raises(torch_format.LayoutError, match="--n_heads=3 must divide d_model=64"):
    _convert_state(tmp_path, state, "heads.pt", n_heads=3)
  ar_state = {k: v for k, v in state.items() if not k.startswith("noise_encoder.")}
  with pytest.raises(ValueError, match="--k=2 was given but .* AR model"):
    _convert_state(tmp_path, ar_state, "ar.pt", k=2)
  _convert_state(tmp_path, ar_state, "twice.pt")
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    _convert_state(tmp_path, ar_state, "twice.pt")
  with pytest.raises(FileNotFoundError, match="no such file"):
    torch_checkpoint.from_torch(str(tmp_path / "nope.pt"), str(tmp_path / "w"))


def test_missing_torch_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    torch_checkpoint.import_torch()


def test_mask_id_defaults():
  emb = lambda v: {"vocab_embed.embedding": np.zeros((v, 8), np.float32),
                   "blocks.0.mlp.0.weight": np.zeros((32, 8), np.float32)}
  assert torch_format.infer_config(emb(30522), 2)[0].mask_id == 103  # bert-base-uncased
  assert torch_format.infer_config(emb(50258), 2)[0].mask_id == 50257  # GPT-2 + mask
  assert torch_format.infer_config(emb(50258), 2, tokenizer="gpt2")[0].mask_id == 50257
  cfg, has_noise = torch_format.infer_config(emb(100), 4, mask_id=7)
  assert (cfg.mask_id, cfg.n_heads, cfg.mlp_ratio, cfg.n_layers, has_noise) == (7, 4, 4, 1, False)
  with pytest.raises(torch_format.LayoutError, match="mask_id=100 is outside the vocabulary"):
    torch_format.infer_config(emb(100), 4, mask_id=100)


def _tiny_tokenizer_file(path, with_mask: bool):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  special = ["<|endoftext|>"] + (["[MASK]"] if with_mask else [])
  trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=special, show_progress=False)
  hf.train_from_iterator(["in the beginning god created the heaven and the earth"] * 4,
                         trainer=trainer)
  hf.save(str(path))
  return hf.get_vocab_size()


def test_tokenizer_file_is_installed_and_generate_can_load_it(tmp_path):
  # Like GPT-2's tokenizer.json: no mask token, so [MASK] is appended as the last id.
  n_ids = _tiny_tokenizer_file(tmp_path / "tok.json", with_mask=False)
  assert n_ids + 1 <= V
  state = _ref_model(False, seed=7).state_dict()
  state = {k: (v[:n_ids + 1] if v.shape[:1] == (V,) else v) for k, v in state.items()}
  _convert_state(tmp_path, state, "tok.pt", tokenizer_file=str(tmp_path / "tok.json"))
  loaded = stage_io.load_stage(str(tmp_path / "w_tok.pt"), "teacher")
  assert loaded.tokenizer.mask_id == loaded.model_cfg.mask_id == n_ids
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("the earth")) == "the earth"
  meta = json.load(open(tmp_path / "w_tok.pt" / "tokenizer_meta.json"))
  assert meta["tokenizer"] == "file"
  with pytest.raises(ValueError, match="mask token has id .* model's mask_id is 3"):
    _convert_state(tmp_path, state, "tok_bad.pt", tokenizer_file=str(tmp_path / "tok.json"),
                   mask_id=3)


def test_cli_from_torch_then_to_torch(tmp_path):
  state = _ref_model(True, seed=8).state_dict()
  _save_lightning(tmp_path / "cli.ckpt", state)
  workdir, out = str(tmp_path / "w"), str(tmp_path / "out.pt")
  # The real command line once (a subprocess: imports jax and torch afresh)...
  proc = subprocess.run([sys.executable, "-m", "kforcing_jax.convert", "--workdir", workdir,
                         "--from_torch", str(tmp_path / "cli.ckpt"), "--n_heads", str(HEADS)],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Wrote stage 'k4'" in proc.stdout
  # ...and the flag wiring of --to_torch in-process (same main()).
  from absl import flags
  from kforcing_jax import convert
  flags.FLAGS(["convert", "--workdir", workdir, "--to_torch", out])
  try:
    convert.main([])
  finally:
    flags.FLAGS.unparse_flags()
  back = torch.load(out, weights_only=True)
  for name, tensor in state.items():
    assert torch.equal(back[name], tensor), name


def test_state_dict_as_the_authors_save_it_with_rotary_buffer(tmp_path):
  """Their model registers the rotary table as a persistent buffer: every saved state dict has
  `rotary_emb.inv_freq`. It converts with no extra flag, the base is read from it, and a table
  that contradicts --n_heads or the sidecar fails with a clear message."""
  state = _ref_model(True, seed=7).state_dict()
  head_dim = D // HEADS
  inv = lambda base: 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
  ours = _convert_state(tmp_path, dict(state, **{"rotary_emb.inv_freq": inv(10000.0)}), "a.pt")
  cfg = json.load(open(os.path.join(ours, "model_config.json")))
  assert cfg["rope_base"] == 10000.0
  _save_lightning(tmp_path / "l.ckpt", dict(state, **{"rotary_emb.inv_freq": inv(500000.0)}))
  out = torch_checkpoint.from_torch(str(tmp_path / "l.ckpt"), str(tmp_path / "wl"), n_heads=HEADS)
  assert json.load(open(os.path.join(out, "model_config.json")))["rope_base"] == 500000.0
  with pytest.raises(torch_format.LayoutError, match=r"rotary_emb\.inv_freq has 16 entries, so "
                     r"head_dim = 32 and n_heads = 2 for d_model=64; --n_heads=4 gives head_dim 16"):
    _convert_state(tmp_path, dict(state, **{"rotary_emb.inv_freq": inv(10000.0)}), "h.pt",
                   n_heads=4)
  with pytest.raises(torch_format.LayoutError, match="not a rotary table"):
    _convert_state(tmp_path, dict(state, **{"rotary_emb.inv_freq": torch.rand(head_dim // 2)}),
                   "r.pt")
