"""grain input pipeline: documents -> tokens + eos separators -> packed rows -> batches.

The central invariant: global batch i has the same rows whatever `process_count` is, and
process p gets rows [p * local, (p + 1) * local) of it (local = global_batch_size //
process_count). Every process therefore defines the same global row stream and keeps its slice,
so multi-host runs see exactly what one host would, and the iterator state (a grain checkpoint)
means the same thing on any topology.

Two routes, chosen by `data.source`:
  * kjv / text_files (small): the tfds builder is prepared once into the shared tfds data dir,
    each split is tokenized whole and cached as one flat int32 array in
    `<workdir>/data_cache/<source>-<split>-<tokenizer hash>.npy`, and a grain MapDataset over
    its rows is shuffled per epoch, repeated and batched. Process p reads only its own rows.
  * tfds (catalog, possibly huge): records are read lazily from `tfds` array_record data
    sources, shuffled per epoch, tokenized inside grain and packed with
    ConcatThenSplitIterDataset; each process packs the full global stream and slices it.
"""

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from kforcing_jax.config import check as config_check
from kforcing_jax.data import kjv, text_files
from kforcing_jax.observe import report

SOURCES = config_check.SOURCES
# A child of the "kforcing_jax" logger: tokenisation progress reaches the user's console.
log = logging.getLogger("kforcing_jax.data")
SPLITS = ("train", "validation")
_PROGRESS_EVERY_S = 5.0


# ---------------------------------------------------------------- documents of a split

def prepared_data_dir(data_cfg, workdir: str) -> str:
  """Where kjv/text_files builders are prepared: data.tfds_data_dir, else <workdir>/../tfds_data."""
  if data_cfg.tfds_data_dir:
    return os.path.expanduser(data_cfg.tfds_data_dir)
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "tfds_data")


def open_split(data_cfg, split: str, workdir: str) -> tuple[grain.MapDataset, str]:
  """(random-access dataset of document strings, key naming this source + split for caches)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = data_cfg.source
  if source == "kjv":
    builder = kjv.Kjv(val_fraction=data_cfg.val_fraction,
                      data_dir=prepared_data_dir(data_cfg, workdir))
    _prepare_locked(builder)
    ds, key = grain.MapDataset.source(builder.as_data_source(split)), builder.info.full_name
  elif source == "text_files":
    paths = text_files.resolve_paths(data_cfg.text_files)
    builder = text_files.TextFiles(paths=paths, val_fraction=data_cfg.val_fraction,
                                   unit=data_cfg.text_files_unit,
                                   data_dir=prepared_data_dir(data_cfg, workdir))
    _prepare_locked(builder)
    ds, key = grain.MapDataset.source(builder.as_data_source(split)), builder.info.full_name
  elif source == "tfds":
    ds, key = _tfds_split(data_cfg, split)
  else:
    raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
  return ds.map(_record_text), f"{key}/{split}".replace("/", "-")


def iter_texts(data_cfg, split: str, workdir: str, *, max_chars: int | None = None
               ) -> Iterator[str]:
  """The documents of a split in stored order (at most max_chars characters in total)."""
  ds, _ = open_split(data_cfg, split, workdir)
  total = 0
  for text in ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)):
    yield text
    total += len(text)
    if max_chars is not None and total >= max_chars:
      return


def _tfds_split(data_cfg, split: str) -> tuple[grain.MapDataset, str]:
  """A catalog split; without a validation/test split, the last val_fraction of train."""
  name = data_cfg.tfds_name
  if not name:
    raise ValueError("data.tfds_name must name a TFDS catalog dataset (e.g. 'lm1b') when "
                     "data.source='tfds'.")
  data_dir = os.path.expanduser(data_cfg.tfds_data_dir) if data_cfg.tfds_data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  except Exception as e:
    raise RuntimeError(
        f"Could not prepare TFDS dataset {name!r} in data.tfds_data_dir={data_dir!r} "
        f"({type(e).__name__}: {e}). Catalog datasets need internet for the first download and "
        "must be prepared with file_format='array_record' (no TensorFlow needed to read them)."
    ) from e
  known = set(builder.info.splits.keys())  # Empty under tfds.testing.mock_data.
  held = next((s for s in ("validation", "test") if s in known), None)
  if held is not None:
    which = "train" if split == "train" else held
    return grain.MapDataset.source(builder.as_data_source(which)), builder.info.full_name
  train = grain.MapDataset.source(builder.as_data_source("train"))
  n_val = max(1, int(round(len(train) * data_cfg.val_fraction)))
  if n_val >= len(train):
    raise ValueError(f"TFDS {name!r} train split ({len(train)} records) is too small to hold out "
                     f"data.val_fraction={data_cfg.val_fraction} for validation.")
  cut = len(train) - n_val
  return (train[:cut] if split == "train" else train[cut:]), builder.info.full_name


def _prepare_locked(builder) -> None:
  """download_and_prepare under a file lock: concurrent processes on a host prepare once."""
  root = os.fspath(builder.data_dir_root)
  os.makedirs(root, exist_ok=True)
  lock_path = os.path.join(root, f".{builder.name}.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _record_text(record: dict[str, Any]) -> str:
  text = record["text"]
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


# ---------------------------------------------------------------- public API

def make_train_iterator(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int,
                        workdir: str, process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of int32 (global_batch_size // process_count, seq_len)."""
  local = _check_args(seq_len, global_batch_size, process_index, process_count)
  seed = int(seed) % 2**32
  if data_cfg.source == "tfds":
    texts, _ = open_split(data_cfg, "train", workdir)
    ds = _packed_stream(data_cfg, texts.shuffle(seed=seed).repeat(), tokenizer, seq_len)
    ds = ds.batch(global_batch_size, drop_remainder=True)
    return iter(ds.map(_RowSlice(process_index * local, local)))
  rows = _cached_rows(data_cfg, tokenizer, "train", workdir, seq_len)
  if len(rows) < global_batch_size:
    raise ValueError(f"The {data_cfg.source} train split packs into only {len(rows)} rows of "
                     f"seq_len={seq_len}, fewer than batch_size={global_batch_size}.")
  # Batches of `local` rows over the global stream; global batch i is batches
  # i*process_count .. i*process_count + process_count - 1, of which this process takes one.
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def make_eval_batches(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int,
                      num_batches: int, workdir: str, process_index: int = 0,
                      process_count: int = 1) -> list[np.ndarray]:
  """The first num_batches validation batches (fewer if the split is short), never shuffled."""
  local = _check_args(seq_len, global_batch_size, process_index, process_count)
  if data_cfg.source == "tfds":
    texts, _ = open_split(data_cfg, "validation", workdir)
    ds = _packed_stream(data_cfg, texts, tokenizer, seq_len).batch(global_batch_size,
                                                                   drop_remainder=True)
    batches = []
    for batch in ds:
      batches.append(batch)
      if len(batches) == num_batches:
        break
    n_rows = len(batches) * global_batch_size
  else:
    rows = _cached_rows(data_cfg, tokenizer, "validation", workdir, seq_len)
    n_rows = len(rows)
    n = min(num_batches, n_rows // global_batch_size)
    batches = list(rows[:n * global_batch_size].reshape(n, global_batch_size, seq_len))
  if not batches:
    raise config_check.UserError(
        f"The {data_cfg.source} validation split packs into {n_rows} rows of seq_len={seq_len}, "
        f"fewer than one batch (batch_size={global_batch_size}); raise data.val_fraction or lower "
        "batch_size / seq_len.")
  if len(batches) < num_batches:
    log.warning("Validation split gives only %d of the %d requested eval batches.",
                    len(batches), num_batches)
  return [np.ascontiguousarray(b[process_index * local:(process_index + 1) * local])
          for b in batches]


def unigram_counts(data_cfg, tokenizer, *, vocab_size: int, workdir: str,
                   max_chars: int = 2**24) -> np.ndarray:
  """Count of every id (documents + eos) in the training split: all of it for the small
  sources (their cached token stream), the first `max_chars` characters for catalog ones.
  The same on every process, so an initialisation built from it is too."""
  if data_cfg.source != "tfds":
    texts, key = open_split(data_cfg, "train", workdir)
    stream = np.load(_stream_path(tokenizer, texts, key, workdir), mmap_mode="r")
  else:
    docs = list(iter_texts(data_cfg, "train", workdir, max_chars=max_chars))
    stream = np.concatenate([np.asarray(ids + [tokenizer.eos_id], np.int32)
                             for ids in tokenizer.encode_batch(docs)] or [np.zeros(0, np.int32)])
  return np.bincount(np.asarray(stream), minlength=vocab_size)[:vocab_size].astype(np.int64)


def _check_args(seq_len: int, global_batch_size: int, process_index: int,
                process_count: int) -> int:
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} must be a positive multiple of the process "
                     f"count ({process_count}).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return global_batch_size // process_count


# ---------------------------------------------------------------- small sources: cached tokens

def _cached_rows(data_cfg, tokenizer, split: str, workdir: str, seq_len: int) -> np.ndarray:
  """Rows (n, seq_len) of the split's token stream; the stream is cached per tokenizer."""
  texts, key = open_split(data_cfg, split, workdir)
  stream = np.load(_stream_path(tokenizer, texts, key, workdir), mmap_mode="r")
  n = len(stream) // seq_len
  return np.asarray(stream[:n * seq_len]).reshape(n, seq_len)


def _stream_path(tokenizer, texts: grain.MapDataset, key: str, workdir: str) -> str:
  """The cached flat token stream of a small source's split, written on first use."""
  path = os.path.join(workdir, "data_cache", f"{key}-tok{tokenizer.fingerprint}.npy")
  if not os.path.exists(path):
    stream = _tokenize_all(texts, tokenizer, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with report.atomic_open(path, "wb") as f:
      np.save(f, stream)
  return path


def _tokenize_all(texts: grain.MapDataset, tokenizer, key: str) -> np.ndarray:
  """All documents of a split, each followed by eos, as one int32 array."""
  start = last = time.time()
  parts, chunk = [], 512
  for lo in range(0, len(texts), chunk):
    docs = [texts[i] for i in range(lo, min(lo + chunk, len(texts)))]
    for ids in tokenizer.encode_batch(docs):
      parts.append(np.asarray(ids + [tokenizer.eos_id], np.int32))
    if time.time() - last > _PROGRESS_EVERY_S:
      last = time.time()
      log.info("Tokenizing %s: %d/%d documents...", key, lo + len(docs), len(texts))
  stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  log.info("Tokenized %s: %d documents, %d tokens in %.1fs.", key, len(texts), len(stream),
               time.time() - start)
  return stream


# ---------------------------------------------------------------- catalog sources: lazy packing

class _Tokenize(grain.transforms.Map):
  """Document text -> {'tokens': ids + [eos]}; a class so worker processes can pickle it."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def map(self, text: str) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(self._tokenizer.encode(text) + [self._tokenizer.eos_id],
                                 np.int32)}


class _RowSlice(grain.transforms.Map):
  """Keeps this process's rows [start, start + size) of a global batch."""

  def __init__(self, start: int, size: int):
    self._start, self._size = start, size

  def map(self, batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch[self._start:self._start + self._size])


def _is_full(packed: dict[str, np.ndarray]) -> bool:
  return bool(packed["tokens_segment_ids"].all())  # 0 = padding (only at a stream's end).


def _packed_stream(data_cfg, texts: grain.MapDataset, tokenizer, seq_len: int) -> grain.IterDataset:
  """Rows of exactly seq_len tokens: documents + eos, concatenated then split."""
  ds = texts.map(_Tokenize(tokenizer)).to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=256))
  if data_cfg.worker_count > 0:
    # Workers tokenize interleaved slices and grain re-interleaves them in order, so packing,
    # which runs after, sees the same document order for any worker_count.
    if not flags.FLAGS.is_parsed():  # grain's worker setup reads absl flags (defaults are fine).
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
  return ds.filter(_is_full).map(_tokens)


def _tokens(packed: dict[str, np.ndarray]) -> np.ndarray:
  return packed["tokens"]
