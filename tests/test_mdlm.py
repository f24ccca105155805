"""The masked-diffusion baseline: the ELBO against a direct NumPy computation, the SUBS
invariants, the bidirectional mask, and the parallel decoder against an uncached step-by-step
reference, its prompt / mask-token invariants and batch invariance; config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kforcing_jax.config import base as config_base
from kforcing_jax.config import check as config_check
from kforcing_jax.diffusion import mdlm
from kforcing_jax.model import attention
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode
from kforcing_jax.serving import mdlm as mdlm_decode

MASK = 60
CFG = model_lib.ModelConfig(vocab_size=61, mask_id=MASK, d_model=32, n_layers=2, n_heads=2,
                            attention="bidirectional")
PROMPTS = [[5, 9, 2], [7, 1, 1, 4, 30, 22, 8], [11, 3, 17, 40, 2]]  # bucket 8


def _params(seed: int = 0):
  with nnx.use_eager_sharding(False):
    graphdef, params = model_lib.split_params(model_lib.Transformer(CFG, nnx.Rngs(seed)))
  # The head is zero-initialised: give it values so tokens depend on the input; the mask id's
  # bias is the largest, so a decoder that did not forbid it would propose it.
  params["head"] = 0.5 * jax.random.normal(jax.random.key(seed + 100), params["head"].shape)
  params["head_bias"] = (0.1 * jax.random.normal(jax.random.key(seed + 101), (CFG.vocab_size,))
                         ).at[MASK].set(50.0)
  return graphdef, params


def _engine(graphdef, params):
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  abstract = model_lib.abstract_model(CFG)
  params = jax.device_put(params, sharding.param_shardings(abstract, mesh, fsdp=False))
  return mdlm_decode.MdlmEngine(graphdef, params, CFG, 0, mesh)


# ---- the objective ----


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
def test_loss_equals_numpy_elbo():
  graphdef, params = _params()
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, MASK)
  spec = mdlm.MdlmSpec(prompt_share=0.5, cut_share=0.5)
  key = jax.random.key(7)
  loss, aux = jax.jit(mdlm.make_loss_fn(spec, graphdef))(params, tokens, key, ())
  c = mdlm.corrupt(spec, key, tokens, MASK)
  # The model's raw outputs; the NumPy side does the shift, SUBS and weighting itself.
  raw = np.asarray(jax.jit(lambda p, z, n: model_lib.merge(graphdef, p).bidirectional_logits(
      z, len_B=n))(params, c.z_BxL, c.len_B))
  x, z = np.asarray(tokens), np.asarray(c.z_BxL)
  masked, scored, t = np.asarray(c.masked_BxL), np.asarray(c.scored_BxL), np.asarray(c.t_B)
  assert masked.any() and (masked <= scored).all() and not scored[:, 0].any()
  assert (z[masked] == MASK).all() and (z[~masked] == x[~masked]).all()
  total = 0.0
  for b in range(x.shape[0]):
    for pos in range(1, x.shape[1]):
      if masked[b, pos]:
        row = raw[b, pos - 1].astype(np.float64)
        row[MASK] = -np.inf
        total += -_log_softmax64(row)[x[b, pos]] / t[b]
  want = total / scored.sum()
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  assert 0 < float(aux["mask_rate"]) <= 1


def test_diffusion_times_are_antithetic_and_in_range():
  t = np.asarray(mdlm.diffusion_times(jax.random.key(0), 8))
  assert (t >= mdlm.T_MIN).all() and (t <= 1).all()
  gaps = np.diff(np.sort(t))
  np.testing.assert_allclose(gaps, (1 - mdlm.T_MIN) / 8, rtol=1e-4)


def test_subs_never_predicts_the_mask_and_copies_unmasked_inputs():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(2, 6, 61).astype(np.float32)).at[..., MASK].set(100.0)
  z = jnp.asarray([[3, MASK, 7, MASK, 0, 59], [MASK] * 6], jnp.int32)
  logp = np.asarray(mdlm.subs_log_probs(logits, z, MASK))
  assert np.isneginf(logp[..., MASK]).all()
  carried = np.asarray(z) != MASK
  np.testing.assert_array_equal(logp[carried].argmax(-1), np.asarray(z)[carried])
  assert (logp[carried].max(-1) == 0).all()
  assert (np.isneginf(logp[carried]).sum(-1) == 60).all()
  np.testing.assert_allclose(np.exp(logp[~carried]).sum(-1), 1.0, rtol=1e-5)


def test_attention_mass_is_the_softmax_share_on_the_marked_keys():
  rng = np.random.RandomState(1)
  q = rng.randn(2, 4, 3, 8).astype(np.float32)  # 4 query heads over 2 kv heads (grouped)
  k = rng.randn(2, 2, 5, 8).astype(np.float32)
  mask = attention.span_mask(jnp.asarray([0, 1]), jnp.asarray([5, 4]), 5)
  to = np.array([[1, 0, 0, 1, 1], [0, 1, 1, 0, 1]], bool)
  got = np.asarray(attention.attention_mass(jnp.asarray(q), jnp.asarray(k), mask,
                                            jnp.asarray(to)))
  want = np.zeros((2, 3))
  for b in range(2):
    keys = np.arange(5)[(np.arange(5) >= [0, 1][b]) & (np.arange(5) < [5, 4][b])]
    for h in range(4):
      s = q[b, h] @ k[b, h // 2, keys].T / np.sqrt(8)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want[b] += (p * to[b, keys]).sum(-1) / 4
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_span_mask_is_bidirectional_within_each_row_span():
  m = np.asarray(attention.span_mask(jnp.asarray([0, 2]), jnp.asarray([3, 5]), 5))[:, 0, 0]
  np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])


def test_bidirectional_logits_see_the_future_and_nothing_past_the_cut():
  graphdef, params = _params()
  m = model_lib.merge(graphdef, params)
  forward = jax.jit(lambda p, x, n: model_lib.merge(graphdef, p).bidirectional_logits(x,
                                                                                      len_B=n))
  x = jnp.asarray([[4, 8, 15, 16, 23, 42]], jnp.int32)
  y = x.at[0, 4].set(5)
  full, cut = jnp.asarray([6]), jnp.asarray([4])
  assert not np.allclose(forward(params, x, full)[0, 0], forward(params, y, full)[0, 0])
  np.testing.assert_allclose(forward(params, x, cut)[0, :4], forward(params, y, cut)[0, :4],
                             atol=1e-6)
  with pytest.raises(ValueError, match="causal"):
    m(x)


# ---- decoding ----


def _reference_greedy(graphdef, params, prompt, max_new):
  """Uncached, one position per pass, left to right: the argmax at the leftmost mask of the
  full bidirectional forward over [prompt ; masks], read one position earlier."""
  forward = jax.jit(lambda p, x: model_lib.merge(graphdef, p).bidirectional_logits(x))
  x = np.array(list(prompt) + [MASK] * max_new, np.int32)
  for i in range(max_new):
    pos = len(prompt) + i
    logits = np.array(forward(params, jnp.asarray(x[None])))[0, pos - 1]
    logits[MASK] = -np.inf
    x[pos] = int(np.argmax(logits))
  return x[len(prompt):].tolist()


@pytest.mark.parametrize("block", [0, 4])
def test_k1_greedy_left_to_right_matches_uncached_reference(block):
  graphdef, params = _params()
  engine = _engine(graphdef, params)
  spec = mdlm_decode.MdlmDecodeSpec(k=1, max_new_tokens=6, commit="greedy", block=block,
                                    tau=0.0)
  got = [c.tokens for c in engine.generate(PROMPTS, spec, seed=0)]
  for prompt, toks in zip(PROMPTS, got):
    assert toks == _reference_greedy(graphdef, params, prompt, 6)


@pytest.mark.slow
@pytest.mark.parametrize("commit,k,block,tau,rerank", [
    ("confidence", 2, 0, 1.0, 0.0), ("greedy", 3, 4, 1.0, 0.0), ("random", 4, 4, 0.0, 0.0),
    ("confidence", 3, 0, 0.0, 2.0)])
def test_decode_invariants_and_batch_invariance(commit, k, block, tau, rerank):
  graphdef, params = _params()
  engine = _engine(graphdef, params)
  spec = mdlm_decode.MdlmDecodeSpec(k=k, max_new_tokens=10, commit=commit, block=block, tau=tau,
                                    rerank=rerank)
  prompt_in, pad, keys = engine.device_inputs(PROMPTS, seed=5)
  # The decode loop's whole sequence: the prompt is never changed, no mask is left.
  full = np.asarray(jax.jit(lambda p, x, pd, kk: jax.lax.fori_loop(
      0, spec.n_passes, lambda _, s: mdlm_decode.decode_pass(
          model_lib.merge(graphdef, p), spec, s, pd, decode.uniforms(kk, 0, 10),
          decode.uniforms(kk, 0, 10, stream=mdlm_decode.ORDER_STREAM)),
      mdlm_decode.initial_tokens(x, 10, MASK)))(engine.params, prompt_in, pad, keys))
  plen = prompt_in.shape[1]
  np.testing.assert_array_equal(full[:, :plen], np.asarray(prompt_in))
  assert (full[:, plen:] != MASK).all()
  batch = [c.tokens for c in engine.generate(PROMPTS, spec, seed=5)]
  assert batch == full[:, plen:].tolist()
  for r, prompt in enumerate(PROMPTS):  # a row decoded alone, under its own row id
    alone = engine.generate([prompt], spec, seed=5, row_ids=[r])[0].tokens
    assert alone == batch[r]


def test_commit_schedule_counts_passes_and_opens_blocks_left_to_right():
  spec = mdlm_decode.MdlmDecodeSpec(k=3, max_new_tokens=10, block=4)
  assert spec.n_passes == 2 + 2 + 1  # blocks of 4, 4, 2
  assert mdlm_decode.MdlmDecodeSpec(k=4, max_new_tokens=10).n_passes == 3
  masked = jnp.asarray([[False] * 4 + [True] * 6, [True] * 10])
  open_ = np.asarray(mdlm_decode.open_positions(spec, masked))
  np.testing.assert_array_equal(open_[0], [0] * 4 + [1] * 4 + [0] * 2)
  np.testing.assert_array_equal(open_[1], [1] * 4 + [0] * 6)


def test_eos_cuts_the_completion():
  graphdef, params = _params()
  engine = _engine(graphdef, params)
  spec = mdlm_decode.MdlmDecodeSpec(k=2, max_new_tokens=8, tau=0.0)
  free = engine.generate(PROMPTS[:1], spec)[0].tokens
  eos = free[3]
  cut = engine.generate(PROMPTS[:1], spec.__class__(k=2, max_new_tokens=8, tau=0.0,
                                                    eos_id=eos))[0]
  assert cut.finished and cut.tokens == free[:free.index(eos) + 1]


def test_spec_and_engine_refuse_bad_settings():
  with pytest.raises(ValueError, match="commit"):
    mdlm_decode.MdlmDecodeSpec(k=2, max_new_tokens=8, commit="best")
  with pytest.raises(ValueError, match="k must be"):
    mdlm_decode.MdlmDecodeSpec(k=0, max_new_tokens=8)
  with pytest.raises(ValueError, match="rerank"):
    mdlm_decode.MdlmDecodeSpec(k=2, max_new_tokens=8, commit="greedy", rerank=1.0)
  graphdef, params = _params()
  engine = _engine(graphdef, params)
  with pytest.raises(ValueError, match="MdlmDecodeSpec"):
    engine.check(decode.DecodeSpec(k=1, max_new_tokens=4, ar=True))
  with pytest.raises(ValueError, match="stream"):
    next(engine.stream(PROMPTS, mdlm_decode.MdlmDecodeSpec(k=2, max_new_tokens=4)))


# ---- config ----


@pytest.mark.parametrize("field,value", [("mdlm.prompt_share", 1.5), ("mdlm.cut_share", -0.1)])
def test_invalid_mdlm_fields_fail_naming_the_field(field, value):
  c = config_base.base_config()
  c.stages = "teacher,k4,mdlm"
  group, name = field.split(".")
  with c.unlocked():
    c[group][name] = value
  with pytest.raises(config_check.ConfigError, match=f"config.{field}"):
    config_check.validate(c, 1)


def test_mdlm_stage_is_outside_the_chain():
  c = config_base.base_config()
  c.stages = "teacher,k4,mdlm"
  config_check.validate(c, 1)
  assert config_check.chain(["teacher", "mdlm", "k4"]) == [
      (None, "teacher"), ("teacher", "mdlm"), ("teacher", "k4")]
  c.stages = "teacher,mdlm"
  with c.unlocked():
    c.model.mask_token = False
  with pytest.raises(config_check.ConfigError, match="config.model.mask_token"):
    config_check.validate(c, 1)


# ---- the tools: generate, benchmark and evaluate pick the method up ----


@pytest.fixture(scope="module")
def mdlm_workdir(tmp_path_factory):
  """A BPE on a small corpus and params-only 'teacher', 'k2' and 'mdlm' checkpoints."""
  from kforcing_jax.data import tokenizer as tokenizer_lib
  from kforcing_jax.model import pflm as pflm_lib
  from kforcing_jax.training import stage_io, trainer

  root = tmp_path_factory.mktemp("mdlm")
  rng = np.random.RandomState(0)
  words = "and the lord said unto moses of israel in that day he shall come behold".split()
  corpus = root / "corpus.txt"
  corpus.write_text("\n\n".join(" ".join(rng.choice(words, rng.randint(8, 30)))
                                for _ in range(300)))
  cfg = config_base.base_config()
  cfg.stages = "teacher,k2,mdlm"
  cfg.data.source, cfg.data.text_files = "text_files", str(corpus)
  cfg.data.tfds_data_dir = str(root / "tfds")
  cfg.data.bpe_vocab_size = 300
  cfg.data.val_fraction = 0.2
  cfg.seq_len = 32
  cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 2
  wd = str(root / "w")
  tok = tokenizer_lib.build_tokenizer(cfg.data, wd)
  model_cfg = trainer.resolve_model_config(cfg, tok)
  mdlm_cfg = trainer.stage_model_config(cfg, model_cfg, "mdlm")
  with nnx.use_eager_sharding(False):
    _, t_params = model_lib.split_params(model_lib.Transformer(model_cfg, nnx.Rngs(0)))
    _, s_params = model_lib.split_params(pflm_lib.PFLM(model_cfg, nnx.Rngs(1)))
  t_params["head"] = 0.3 * jax.random.normal(jax.random.key(2), t_params["head"].shape)
  meta = {"config": cfg.to_dict()}
  stage_io.save_params_stage(wd, "teacher", t_params, model_cfg, step=5, extra_meta=meta)
  stage_io.save_params_stage(wd, "k2", pflm_lib.init_from(t_params, s_params), model_cfg,
                             step=3, extra_meta=meta)
  stage_io.save_params_stage(wd, "mdlm", t_params, mdlm_cfg, step=4, extra_meta=meta)
  return wd


def _run(module, *args):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", f"kforcing_jax.{module}", *args], cwd=root,
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_serving_the_mdlm_stage_is_a_one_line_error(mdlm_workdir):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "kforcing_jax.serve", f"--workdir={mdlm_workdir}",
                        "--stage=mdlm", "--port=0"], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root), timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--stage mdlm: the masked-diffusion baseline is offline only" in out.stderr


@pytest.mark.slow
def test_generate_benchmark_and_evaluate_decode_the_mdlm_stage(mdlm_workdir, tmp_path):
  import json

  from kforcing_jax.training import stage_io
  assert stage_io.list_stages(mdlm_workdir) == ["teacher", "k2"]  # outside the chain
  assert stage_io.list_stages(mdlm_workdir, include_mdlm=True) == ["teacher", "mdlm", "k2"]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('"and the lord"\n"behold"\n"he shall come unto the"\n')
  out = tmp_path / "samples.jsonl"
  _run("generate", f"--workdir={mdlm_workdir}", "--method=mdlm", "--commit=random", "--k=2",
       f"--prompts={prompts}", "--max_new_tokens=6", "--batch_size=2", "--nostop_at_eos",
       f"--out={out}")
  recs = [json.loads(x) for x in out.read_text().splitlines()]
  assert all(r["stage"] == "mdlm" and r["method"] == "mdlm_random" and r["k"] == 2
             and len(r["completion_ids"]) == 6 for r in recs)
  bench = tmp_path / "bench.json"
  _run("benchmark", f"--workdir={mdlm_workdir}", "--methods=ar,pflm,mdlm", "--batch_sizes=2",
       "--k=1,2", "--reps=1", "--prompt_len=8", "--max_new_tokens=8", f"--out={bench}")
  rows = json.loads(bench.read_text())["rows"]
  assert {(r["method"], r["k"]) for r in rows} == {
      ("ar", 1), ("pflm", 1), ("pflm", 2), ("mdlm", 1), ("mdlm", 2)}
  assert all(r["tokens_per_s"] > 0 and r["commit"] == "confidence"
             for r in rows if r["method"] == "mdlm")
  ev = tmp_path / "eval.json"
  stdout = _run("evaluate", f"--workdir={mdlm_workdir}", f"--out={ev}", "--num_prompts=4",
                "--prompt_len=6", "--max_new_tokens=6", "--batch_size=4", "--val_seqs=4",
                "--floor_samples=0", "--nolossless", "--mdlm_k=1,2",
                "--mdlm_commits=confidence,random")
  assert "mdlm:random" in stdout and "mdlm:conf " in stdout
  rows = json.loads(ev.read_text())["rows"]
  got = [(r["method"], r.get("commit"), r["k"]) for r in rows if r["method"] == "mdlm"]
  assert got == [("mdlm", c, k) for k in (1, 2) for c in ("confidence", "random")]
  assert all(r["gen_ppl"] > 1 and r["tokens_per_pass"] == r["k"] for r in rows
             if r["method"] == "mdlm")
