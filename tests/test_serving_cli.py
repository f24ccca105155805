"""generate / benchmark / evaluate end to end, as subprocesses, on a small work dir: a BPE
tokenizer trained on a local text corpus and params-only "teacher", "k2" and "draft" checkpoints
(random weights; the PFLM starts from the teacher's, as distillation does) written by stage_io."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from kforcing_jax.config import base as config_base
from kforcing_jax.training import stage_io
from kforcing_jax.training import trainer
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.data import tokenizer as tokenizer_lib

# Slow tier (-m 'not slow' skips it): each test runs a command-line tool in a fresh process.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("and the lord said unto moses of israel in that day he shall come thou art my "
         "people land house king children behold went out spake").split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  rng = np.random.RandomState(0)
  corpus = root / "corpus.txt"
  corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS, rng.randint(8, 30)))
                                for _ in range(400)))
  cfg = config_base.base_config()
  cfg.stages = "teacher,k2"
  cfg.data.source, cfg.data.text_files = "text_files", str(corpus)
  cfg.data.tfds_data_dir = str(root / "tfds")
  cfg.data.bpe_vocab_size = 300
  cfg.data.val_fraction = 0.2
  cfg.seq_len = 32
  cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 2
  wd = str(root / "w")
  tok = tokenizer_lib.build_tokenizer(cfg.data, wd)
  model_cfg = trainer.resolve_model_config(cfg, tok)
  with nnx.use_eager_sharding(False):
    _, t_params = model_lib.split_params(model_lib.Transformer(model_cfg, nnx.Rngs(0)))
    _, s_params = model_lib.split_params(pflm_lib.PFLM(model_cfg, nnx.Rngs(1)))
  t_params["head"] = 0.3 * jax.random.normal(jax.random.key(2), t_params["head"].shape)
  meta = {"config": cfg.to_dict()}
  stage_io.save_params_stage(wd, "teacher", t_params, model_cfg, step=5, extra_meta=meta)
  stage_io.save_params_stage(wd, "k2", pflm_lib.init_from(t_params, s_params), model_cfg,
                             step=3, extra_meta=meta)
  cfg.draft.d_model, cfg.draft.n_layers = 16, 1
  draft_cfg = trainer.stage_model_config(cfg, model_cfg, "draft")
  with nnx.use_eager_sharding(False):
    _, d_params = model_lib.split_params(model_lib.Transformer(draft_cfg, nnx.Rngs(3)))
  d_params["head"] = 0.3 * jax.random.normal(jax.random.key(4), d_params["head"].shape)
  stage_io.save_params_stage(wd, "draft", d_params, draft_cfg, step=2, extra_meta=meta)
  return wd


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", f"kforcing_jax.{module}", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_generate_cli_pflm_and_teacher(workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "and the lord"}\n"behold"\n{"text": "he shall come unto"}\n')
  out = tmp_path / "samples.jsonl"
  _run("generate", f"--workdir={workdir}", f"--prompts={prompts}", "--k=2", "--batch_size=2",
       "--max_new_tokens=7", f"--out={out}", "--nostop_at_eos")
  recs = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["index"] for r in recs] == [0, 1, 2]
  assert all(r["stage"] == "k2" and r["k"] == 2 and len(r["completion_ids"]) == 7 for r in recs)
  assert recs[1]["prompt"] == "behold" and isinstance(recs[1]["completion"], str)
  # The teacher decodes as the AR baseline.
  out2 = tmp_path / "ar.jsonl"
  _run("generate", f"--workdir={workdir}", "--stage=teacher", f"--prompts={prompts}",
       "--max_new_tokens=5", f"--out={out2}")
  ar = [json.loads(x) for x in out2.read_text().splitlines()]
  assert all(r["method"] == "ar" and 1 <= len(r["completion_ids"]) <= 5 for r in ar)


def test_generate_cli_lossless_methods_reproduce_the_teacher(workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('"and the lord"\n"behold"\n"he shall come unto the"\n')

  def gen(name, *args):
    out = tmp_path / f"{name}.jsonl"
    _run("generate", f"--workdir={workdir}", f"--prompts={prompts}", "--max_new_tokens=9",
         "--batch_size=2", "--seed=4", f"--out={out}", *args)
    return [json.loads(x) for x in out.read_text().splitlines()]

  teacher = gen("ar", "--stage=teacher")
  verified = gen("pv", "--method=pflm_verified")  # the last PFLM stage (k2) drafts
  assert [r["completion_ids"] for r in verified] == [r["completion_ids"] for r in teacher]
  assert all(r["method"] == "pflm_verified" and r["stage"] == "k2" and r["k"] == 2 and
             0 <= r["accepted"] <= r["drafted"] for r in verified)
  greedy = gen("arg", "--stage=teacher", "--temperature=0")
  spec = gen("spec", "--method=spec", "--temperature=0", "--gamma=3")
  assert [r["completion_ids"] for r in spec] == [r["completion_ids"] for r in greedy]
  assert all(r["method"] == "spec_greedy" and r["stage"] == "draft" for r in spec)
  sampled = gen("specs", "--method=spec_dynamic")
  assert all(1 <= len(r["completion_ids"]) <= 9 for r in sampled)


def test_benchmark_cli_lossless_methods(workdir, tmp_path):
  out = tmp_path / "bench.json"
  stdout = _run("benchmark", f"--workdir={workdir}", "--batch_sizes=1,3", "--k=2", "--reps=1",
                "--prompt_len=8", "--max_new_tokens=8", f"--out={out}", "--gamma=3",
                "--methods=ar,pflm,pflm_verified,spec,spec_dynamic")
  assert "tok/pass" in stdout
  rows = json.loads(out.read_text())["rows"]
  assert {(r["method"], r["k"], r["batch_size"]) for r in rows} == {
      (m, k, b) for b in (1, 3) for m, k in (("ar", 1), ("pflm", 2), ("pflm_verified", 2),
                                             ("spec", 3), ("spec_dynamic", 3))}
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0
    if r["method"] in ("pflm_verified", "spec", "spec_dynamic"):
      acc = r["acceptance"]
      assert 0 <= acc["acceptance"] <= 1 and 1 <= r["tokens_per_pass"] <= r["k"] + 1
    else:
      assert r["tokens_per_pass"] == (r["k"] if r["method"] == "pflm" else 1)
  assert os.path.getsize(tmp_path / "bench.png") > 1000


def test_benchmark_cli(workdir, tmp_path):
  out = tmp_path / "bench.json"
  stdout = _run("benchmark", f"--workdir={workdir}", "--batch_sizes=2", "--k=1,2", "--reps=1",
                "--prompt_len=8", "--max_new_tokens=8", f"--out={out}")
  assert "speedup" in stdout and "ar_stepwise" in stdout
  data = json.loads(out.read_text())
  rows = data["rows"]
  assert {(r["method"], r["k"], r["batch_size"]) for r in rows} == {
      (m, k, b) for b in (2,) for m, k in (("ar", 1), ("ar_stepwise", 1), ("pflm", 1),
                                            ("pflm", 2))}
  assert data["complete"] is True
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["roofline_bound"] > 0
    assert r["matmul_bound"] > 0 and (r["method"] == "pflm" or r["matmul_bound"] == 1.0)
    assert set(r) >= {"method", "k", "batch_size", "tokens_per_s", "speedup_vs_ar",
                      "roofline_bound"}
  assert os.path.getsize(tmp_path / "bench.png") > 1000


def test_evaluate_cli(workdir, tmp_path):
  # A second AR model (another output head) scores the same samples: its Gen-PPL must differ.
  import shutil
  other = str(tmp_path / "other")
  teacher = stage_io.load_stage(workdir, "teacher")
  params = jax.tree.map(np.asarray, teacher.params)
  params["head"] = 0.3 * np.asarray(jax.random.normal(jax.random.key(7), params["head"].shape))
  stage_io.save_params_stage(other, "teacher", params, teacher.model_cfg, step=1,
                             extra_meta={"config": teacher.meta["config"]})
  shutil.copy(os.path.join(workdir, "tokenizer.json"), os.path.join(other, "tokenizer.json"))
  out = tmp_path / "eval.json"
  stdout = _run("evaluate", f"--workdir={workdir}", f"--out={out}", "--num_prompts=6",
                "--prompt_len=6", "--max_new_tokens=6", "--batch_size=8", "--val_seqs=4",
                f"--evaluator_workdir={other}")
  assert "gen_ppl" in stdout and "z-blind" in stdout and "prefix-known" in stdout
  rows = json.loads(out.read_text())["rows"]
  # The teacher row's reference points for the k2 student's NLL_j (offset_floors).
  t = rows[0]
  assert t["blind_lo_1"] == pytest.approx(t["prefix_1"], rel=1e-5)
  assert t["prefix_2"] < t["blind_lo_2"] and "blind_3" not in t
  assert [(r["method"], r["stage"], r["k"]) for r in rows] == [
      ("ar", "teacher", 1), ("pflm", "k2", 1), ("pflm", "k2", 2), ("pflm_verified", "k2", 2),
      ("spec", "draft", 4), ("spec_dynamic", "draft", 4)]
  # Entropy per block offset: the teacher split by the largest k (2), each PFLM row by its k.
  assert [len(r["entropy_by_offset"]) for r in rows] == [2, 1, 2, 2, 2, 2]
  for r in rows:
    assert r["gen_ppl"] > 1 and r["eval_ppl"] > 1
    assert r["eval_ppl"] != pytest.approx(r["gen_ppl"], rel=1e-3)
  # pflm_verified decodes the teacher's own samples (same uniforms): identical quality.
  lossless = rows[3]
  assert lossless["agree"] == 1.0 and lossless["gen_ppl"] == pytest.approx(rows[0]["gen_ppl"])
  assert all(0 <= r["acceptance"] <= 1 and r["tokens_per_pass"] >= 1 for r in rows[3:])
  rows = [r for r in rows if "acceptance" not in r]
  # The teacher's data NLL, recomputed here by a plain forward pass and log-softmax in numpy.
  from kforcing_jax.serving import quality
  val = np.asarray(quality.held_out(teacher, workdir, 6))[:4]
  logits = np.asarray(teacher.model()(jax.numpy.asarray(val[:, :-1])), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, val[:, 1:, None], -1).mean()
  assert rows[0]["data_nll"] == pytest.approx(nll, rel=1e-4)
  for r in rows[1:]:
    assert 0 <= r["agree"] <= 1 and 0 <= r["acc_all"] <= 1
    assert all(f"nll_{j}" in r for j in range(1, r["k"] + 1))
    # Paired by row over rows of equal length, the mean gap is the gap of the means.
    for j in range(1, r["k"] + 1):
      assert r[f"gap_{j}"] == pytest.approx(r[f"nll_{j}"] - nll, abs=1e-4)
      assert r[f"gap_se_{j}"] > 0
  assert "gap to data" in stdout and "s.e." in stdout
  # Where the full window misses: its shares over the q(y_j) bins sum to 1, and acc_j is their
  # share-weighted mean of the bins' accuracies.
  assert "where each stage's full window misses" in stdout
  full = rows[-1]
  for j in (1, 2):
    assert sum(full[f"q_share_{j}"]) == pytest.approx(1.0)
    assert sum(s * a for s, a in zip(full[f"q_share_{j}"], full[f"acc_q_{j}"]) if s) == \
        pytest.approx(full[f"acc_{j}"], abs=1e-6)
    assert 0 <= full[f"argmax_entropy_{j}"] and 0 < full[f"target_entropy_{j}"]


def test_evaluate_frequency_penalty_applies_to_the_pflm_rows_only(workdir):
  from kforcing_jax.serving import quality

  teacher = stage_io.load_stage(workdir, "teacher")
  k2 = stage_io.load_stage(workdir, "k2", load_tokenizer=False)
  val = np.asarray(quality.held_out(teacher, workdir, 4))
  prompts = [[teacher.tokenizer.eos_id] + r[:5].tolist() for r in val]
  run = lambda penalty: quality.evaluate(teacher, [k2], prompts, val, 12, 8, 0,
                                         progress=lambda m: None, floor_samples=0,
                                         windows=[2], frequency_penalty=penalty)
  (rows0, s0), (rows5, s5) = run(0.0), run(5.0)
  assert s0["teacher@k1"] == s5["teacher@k1"] and rows0[0]["gen_ppl"] == rows5[0]["gen_ppl"]
  assert s0["k2@k2"] != s5["k2@k2"]
  assert rows5[1]["entropy"] > rows0[1]["entropy"] and rows5[1]["rep_2"] <= rows0[1]["rep_2"]
  assert rows5[1]["nll_2"] == rows0[1]["nll_2"]  # the one-pass window metrics are argmax-free


def test_evaluate_skips_stages_not_trained_at_a_temperature_or_filter(workdir):
  """k2 was trained at temperature 1 only: at 0.8, or with a top-p filter, only the teacher is
  evaluated (the rows say how it sampled); at 1 both are."""
  from kforcing_jax.serving import quality

  teacher = stage_io.load_stage(workdir, "teacher")
  k2 = stage_io.load_stage(workdir, "k2", load_tokenizer=False)
  val = np.asarray(quality.held_out(teacher, workdir, 4))
  prompts = [[teacher.tokenizer.eos_id] + r[:5].tolist() for r in val]
  notes = []
  run = lambda **kw: quality.evaluate(teacher, [k2], prompts, val, 12, 8, 0,
                                      progress=notes.append, floor_samples=0, windows=[2], **kw)
  cold, _ = run(temperature=0.8)
  assert [(r["stage"], r["temperature"]) for r in cold] == [("teacher", 0.8)]
  assert any("k2: skipped at temperature 0.8 (trained at 1)" in n for n in notes)
  nucleus, samples = run(top_p=0.5)
  assert [r["stage"] for r in nucleus] == ["teacher"] and nucleus[0]["top_p"] == 0.5
  warm, _ = run()
  assert [r["stage"] for r in warm] == ["teacher", "k2"]
  # The nucleus keeps the teacher's likeliest ids, so the teacher finds its samples likelier.
  # (Not the unigram entropy: 12 tokens of a toy teacher are often all distinct, ln 12 both ways.)
  assert nucleus[0]["gen_ppl"] < warm[0]["gen_ppl"]


def test_evaluate_asking_for_more_rows_than_the_split_has_is_one_line(workdir, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "kforcing_jax.evaluate", f"--workdir={workdir}",
                        f"--out={tmp_path / 'e.json'}", "--val_seqs=100000"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "100000 held-out rows asked for" in out.stderr
