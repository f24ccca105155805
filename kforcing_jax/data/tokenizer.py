"""Tokenizers: a byte-level BPE trained on the training split, or GPT-2 / BERT vocabularies.

Whatever `data.tokenizer` says, the chosen tokenizer is saved as `<workdir>/tokenizer.json`
(with `tokenizer_meta.json` naming the choice) and later runs load that file, so resuming needs
no internet and never retrains. Two ids are reserved: `eos_id` separates packed documents and
`mask_id` is the K-Forcing mask input; `encode` treats their spellings in raw text as plain
text, so neither id can come from data.

An imported model's tokenizer (`data/hf_tokenizer.py`: a HF model dir or a GGUF file) is saved the
same way, with `tokenizer_meta.json` {"tokenizer": "imported", ...} carrying its special ids, its
BOS rule and its chat template; it has no mask id, and it reads special-token spellings in text
as those tokens, as the model's own tokenizer does.
"""

import collections
import hashlib
import itertools
import json
import os
import time

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kforcing_jax.config import check as config_check
from kforcing_jax.data import pipeline
from kforcing_jax.observe import report

KINDS = config_check.TOKENIZERS
MASK_TOKENS = ("[MASK]", "<mask>")
# (ids, mask id) of the standard tokenizers as this project uses them, known without building
# them (dry runs, the authors' checkpoints): bert-base-uncased has [MASK] = 103; GPT-2's 50257
# ids get one added mask id. A trained BPE reserves id 0 (end of document) and id 1 (mask).
KNOWN_SIZES = {"bert-base-uncased": (30522, 103), "gpt2": (50258, 50257)}
BPE_MASK_ID = 1
EOS_TOKENS = ("<|endoftext|>", "[SEP]", "</s>")
# BPE training reads at most this many characters of the training split (all of kjv).
BPE_MAX_TRAIN_CHARS = 200_000_000


# `tokenizer_meta.json`'s "tokenizer" for a tokenizer imported with a model (hf_tokenizer.py).
IMPORTED = "imported"
META_FILE = "tokenizer_meta.json"


class Tokenizer:
  """A HF `tokenizers.Tokenizer` plus the special ids the model relies on.

  `imported`: None for this project's own tokenizers (eos and mask found by name; prompts start
  with eos). For a model's own tokenizer, its `tokenizer_meta.json` dict: eos_id (the stop
  token), bos_id, add_bos (whether the model puts bos before a prompt), mask_id (None: imported
  models have none), chat_template (a jinja2 string or None) and special_tokens (names such as
  bos_token -> their strings, for the template).
  """

  def __init__(self, hf: tokenizers.Tokenizer, imported: dict | None = None):
    self.hf = hf
    self.imported = imported
    if imported is None:
      self.hf.encode_special_tokens = True  # "[MASK]" typed in the text is just text.
      vocab = hf.get_vocab(with_added_tokens=True)
      self.mask_id = _first_id(vocab, MASK_TOKENS, "mask")
      self.eos_id = _first_id(vocab, EOS_TOKENS, "end-of-document")
      self.bos_id, self.add_bos, self.chat_template = None, False, None
      self.special_tokens: dict[str, str] = {}
    else:  # the model's own rules; "<|im_start|>" in text is that token, as in transformers
      self.hf.encode_special_tokens = False
      opt = lambda key: None if imported.get(key) is None else int(imported[key])
      self.mask_id, self.eos_id, self.bos_id = opt("mask_id"), opt("eos_id"), opt("bos_id")
      if self.eos_id is None:
        raise ValueError("an imported tokenizer needs an eos_id (its stop token)")
      self.add_bos = bool(imported.get("add_bos", False))
      if self.add_bos and self.bos_id is None:
        raise ValueError("the imported tokenizer adds a BOS token but names no bos_id")
      self.chat_template = imported.get("chat_template") or None
      self.special_tokens = dict(imported.get("special_tokens") or {})
    self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
    self.fingerprint = hashlib.sha256(hf.to_str().encode("utf-8")).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  @property
  def prompt_start(self) -> list[int]:
    """The ids every prompt begins with: eos (the start-of-document token) for this project's
    tokenizers; for an imported one what the model's own does (bos only if it adds one)."""
    if self.imported is None:
      return [self.eos_id]
    return [self.bos_id] if self.add_bos else []

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt's ids: `prompt_start` + the text's."""
    return self.prompt_start + self.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Parallel (Rust threads) encode; used when tokenizing whole splits."""
    return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template writes it (see hf_tokenizer.render_chat)."""
    from kforcing_jax.data import hf_tokenizer  # pylint: disable=import-outside-toplevel
    return hf_tokenizer.render_chat(self, messages, add_generation_prompt)

  def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                  sanitize: bool = False) -> list[int]:
    """The rendered conversation's ids. Imported: as transformers' apply_chat_template(
    tokenize=True) (the template writes any bos itself); with `sanitize`, control tokens typed
    inside messages stay plain text (its sanitize_control_tokens=True). Ours: encode_prompt of
    the text (which reads no spelling as a special token anyway)."""
    if self.imported is None:
      return self.encode_prompt(self.render_chat(messages, add_generation_prompt))
    if sanitize:
      from kforcing_jax.data import hf_tokenizer  # pylint: disable=import-outside-toplevel
      return hf_tokenizer.encode_chat_sanitized(self, messages, add_generation_prompt)
    return self.encode(self.render_chat(messages, add_generation_prompt))

  def save(self, path: str) -> None:
    report.write_text(path, self.hf.to_str())

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """`path` (a tokenizer.json); an imported one's rules come from the META_FILE beside it."""
    hf = tokenizers.Tokenizer.from_file(path)
    meta_path = os.path.join(os.path.dirname(path), META_FILE)
    if os.path.exists(meta_path):
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
      if isinstance(meta, dict) and meta.get("tokenizer") == IMPORTED:
        return cls(hf, imported=meta)
    return cls(hf)


def build_tokenizer(data_cfg, workdir: str) -> Tokenizer:
  """Loads `<workdir>/tokenizer.json`, or creates it as `data.tokenizer` asks (once)."""
  kind = data_cfg.tokenizer
  if kind not in KINDS:
    raise ValueError(f"data.tokenizer must be one of {KINDS}, got {kind!r}")
  meta = {"tokenizer": kind}
  if kind == "bpe":
    meta["bpe_vocab_size"] = int(data_cfg.bpe_vocab_size)
    if data_cfg.bpe_id_order != "merges":  # so work dirs made before the field still match
      meta["bpe_id_order"] = data_cfg.bpe_id_order
  path = os.path.join(workdir, "tokenizer.json")
  meta_path = os.path.join(workdir, META_FILE)
  if os.path.exists(path):
    saved = meta
    if os.path.exists(meta_path):
      with open(meta_path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("tokenizer") == IMPORTED:  # an imported model's: its vocabulary is fixed
      pipeline.log.info("Using the work dir's imported tokenizer (from %s); data.tokenizer=%r "
                        "does not apply.", saved.get("source"), kind)
      return Tokenizer.load(path)
    if saved != meta:
      raise ValueError(f"{path} was built for {saved} but the config asks for {meta} "
                       "(data.tokenizer / data.bpe_vocab_size / data.bpe_id_order); use a fresh workdir.")
    return Tokenizer.load(path)
  tok = _train_bpe(data_cfg, workdir) if kind == "bpe" else _pretrained(kind)
  os.makedirs(workdir, exist_ok=True)
  tok.save(path)
  report.write_text(meta_path, json.dumps(meta))
  return tok


def _train_bpe(data_cfg, workdir: str) -> Tokenizer:
  vocab_size = int(data_cfg.bpe_vocab_size)
  if vocab_size < config_check.MIN_BPE_VOCAB:
    raise config_check.ConfigError(
        f"config.data.bpe_vocab_size: must be >= {config_check.MIN_BPE_VOCAB} (256 bytes + eos "
        f"+ mask), got {vocab_size}")
  start = time.time()
  pipeline.log.info("Training a %d-id byte-level BPE on the %s train split...", vocab_size,
               data_cfg.source)
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKENS[0], MASK_TOKENS[0]],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  texts = lambda: pipeline.iter_texts(data_cfg, "train", workdir, max_chars=BPE_MAX_TRAIN_CHARS)
  hf.train_from_iterator(texts(), trainer=trainer)
  if data_cfg.bpe_id_order == "frequency":
    hf = _frequency_order(hf, texts())
  tok = Tokenizer(hf)
  if tok.vocab_size < vocab_size:
    pipeline.log.warning("BPE stopped at %d ids (< data.bpe_vocab_size=%d): the corpus has no more "
                    "merges.", tok.vocab_size, vocab_size)
  pipeline.log.info("Trained BPE (%d ids) in %.1fs.", tok.vocab_size, time.time() - start)
  return tok


def _encoded(hf: tokenizers.Tokenizer, texts):
  """Token ids of each text (encode_batch: parallel Rust threads)."""
  texts = iter(texts)
  while chunk := list(itertools.islice(texts, 256)):
    for enc in hf.encode_batch(chunk, add_special_tokens=False):
      yield enc.ids


def _renumbered(hf: tokenizers.Tokenizer, key) -> tokenizers.Tokenizer:
  """The same tokenizer with its non-special ids renumbered in ascending `key(old id)` (the
  special ids 0 and 1 stay). Token strings and merges are unchanged, so every text tokenizes
  to the same pieces; only which id each piece gets, hence the inverse-CDF's order, changes."""
  spec = json.loads(hf.to_str())
  vocab = spec["model"]["vocab"]
  special = {t["id"] for t in spec["added_tokens"]}
  movable = sorted((i for i in vocab.values() if i not in special), key=key)
  slots = sorted(i for i in vocab.values() if i not in special)
  new_id = dict(zip(movable, slots))
  spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _frequency_order(hf: tokenizers.Tokenizer, texts) -> tokenizers.Tokenizer:
  """Ids by descending count in `texts` (ties and unseen tokens keep merge order). Why: the
  inverse-CDF of sampling runs over ids in order, and with frequent tokens first a context's
  likely tokens tend to sit together at the start of [0, 1], a map from z to tokens a student
  learns faster."""
  counts = collections.Counter()
  for ids in _encoded(hf, texts):
    counts.update(ids)
  return _renumbered(hf, lambda i: (-counts[i], i))


def _from_hub(name: str) -> tokenizers.Tokenizer:
  """Downloads tokenizer.json from the Hugging Face hub (tests replace this)."""
  return tokenizers.Tokenizer.from_pretrained(name)


def _pretrained(name: str) -> Tokenizer:
  try:
    hf = _from_hub(name)
  except Exception as e:  # The hub raises assorted errors offline.
    raise RuntimeError(
        f"Could not download the {name!r} tokenizer ({type(e).__name__}: {e}). It needs internet "
        "once, after which it is saved in the workdir; offline, use data.tokenizer='bpe' or copy "
        "a tokenizer.json into the workdir.") from e
  if not any(hf.token_to_id(t) is not None for t in MASK_TOKENS):
    hf.add_special_tokens([MASK_TOKENS[0]])  # GPT-2: new id 50257.
  return Tokenizer(hf)


def _first_id(vocab: dict[str, int], names: tuple[str, ...], what: str) -> int:
  for name in names:
    if name in vocab:
      return vocab[name]
  raise ValueError(f"Tokenizer has no {what} token (looked for {names}).")

