"""TFDS builder over the user's own local UTF-8 text files.

A document is a whole file (unit="file") or one blank-line-separated block of a file
(unit="paragraph", which lets a single long file still have a validation split). Documents go
to `validation` by the same stable hash as the KJV builder, keyed by "<path>:<block index>".

The builder config name is a hash of every file's absolute path, size and mtime plus the split
settings, so editing, adding or removing a file yields a new prepared copy instead of silently
reusing stale data.
"""

import glob
import hashlib
import json
import os
import re

import tensorflow_datasets as tfds

from kforcing_jax.data import kjv

UNITS = ("file", "paragraph")


def resolve_paths(spec: str) -> list[str]:
  """Expands `data.text_files` (comma-separated paths, globs or directories) to sorted files."""
  items = [s.strip() for s in spec.split(",") if s.strip()]
  if not items:
    raise ValueError("data.text_files is empty; set it to comma-separated file paths or globs "
                     "when data.source='text_files'.")
  files = set()
  for item in items:
    matched = glob.glob(os.path.expanduser(item), recursive=True)
    found = []
    for m in matched:
      if os.path.isdir(m):
        found += [os.path.join(d, f) for d, _, fs in os.walk(m) for f in fs]
      elif os.path.isfile(m):
        found.append(m)
    if not found:
      raise ValueError(f"data.text_files entry {item!r} matched no files.")
    files.update(os.path.abspath(f) for f in found)
  return sorted(files)


def fingerprint(paths: list[str], val_fraction: float, unit: str) -> str:
  """Short hash naming the prepared data: it changes whenever any input file changes."""
  stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  blob = json.dumps({"files": stats, "val_fraction": val_fraction, "unit": unit})
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def split_documents(text: str, unit: str) -> list[str]:
  """The documents of one file's text."""
  if unit == "file":
    return [text] if text.strip() else []
  return [b.strip("\n") for b in re.split(r"\n[ \t\r]*\n", text) if b.strip()]


class TextFiles(kjv.DocumentBuilder):
  """Local text files: {'id': '<path>:<block>', 'text': ...} per document."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Files or paragraph blocks; hash-based validation split."}

  def __init__(self, *, paths: list[str], val_fraction: float, unit: str, **kwargs):
    if unit not in UNITS:
      raise ValueError(f"data.text_files_unit must be one of {UNITS}, got {unit!r}")
    self._paths, self._unit = list(paths), unit
    super().__init__(val_fraction=val_fraction,
                     name="h" + fingerprint(self._paths, val_fraction, unit), **kwargs)

  def _documents(self) -> list[tuple[str, str]]:
    docs = []
    for path in self._paths:
      with open(path, "r", encoding="utf-8", errors="replace") as f:
        blocks = split_documents(f.read(), self._unit)
      docs += [(f"{path}:{i}", b) for i, b in enumerate(blocks)]
    if len(docs) < 2:
      raise ValueError(
          f"data.text_files gave {len(docs)} document(s) (data.text_files_unit={self._unit!r}); "
          "need at least 2 so one can be held out for validation.")
    return docs
