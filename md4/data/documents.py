"""Document corpora (OpenWebText, FineWeb-Edu, a user's own text): prepare once, then load.

`prepare_documents` reads documents from local files in the formats of the public dumps, splits
them into train / valid, tokenizes them, and packs each split into fixed-length blocks written as
ArrayRecord shards; `PackedBlocks` serves those blocks as a `base.Dataset`.

Inputs: files, directories (searched recursively) or glob patterns, expanded and sorted by path.
  *.parquet          one document per row of the column "text" (read in bounded batches);
  *.jsonl, *.jsonl.gz one JSON object per line, the document in its field "text";
  *.txt              the whole file is one document.
Empty documents ("") are skipped and counted in the meta.

Held-out rule: a document goes to the "valid" split iff u < heldout_fraction, where u is the
first 8 bytes of blake2b(UTF-8 text of the document, key = seed as 8 little-endian bytes) read as a
little-endian unsigned integer and divided by 2^64. The split is thus a function of the document's
text and the seed alone: stable across runs, independent of file order and sharding, and exact
duplicates of a document always land in the same split.

Packing: each split is the concatenation, in input order, of every document's tokens followed by
one EOS; it is cut into blocks of seq_length tokens with no token dropped. Only the split's last
block may be partial; it is padded with EOS, and meta["splits"][split]["tokens"] holds the real
count (blocks * seq_length - tokens pad tokens sit at the very end of the last block).

Layout under data_dir/<name>/ (written to a hidden temporary directory, renamed when complete):
  meta.json                                 tokenizer, vocab, seq_length, dtype, counts, sources
  train-NNNNN-of-MMMMM.array_record         one record per block: seq_length tokens, little-endian
  valid-NNNNN-of-MMMMM.array_record           uint16 if vocab_size <= 65536, else int32
  sentencepiece.model                       a copy of the model, for "sentencepiece:PATH" tokenizers
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator, Sequence

import grain
import numpy as np
import tqdm

from md4.data import base
from md4.data import tokenizers

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
_SPM_COPY = "sentencepiece.model"
_ENCODE_BATCH = 256  # Documents per tokenizer call (tokenizers use threads within a call).
_PARQUET_BATCH = 1024  # Rows per read: memory stays bounded by this, not by the file.


# ---------------------------------------------------------------------------------------------
# Reading documents.


def _format(path: str) -> str | None:
  for suffix in SUFFIXES:
    if path.endswith(suffix):
      return suffix
  return None


def list_files(inputs: Sequence[str]) -> list[str]:
  """Expands files, directories and glob patterns into a sorted list of absolute paths.

  Raises:
    ValueError: no inputs; a pattern or directory that matches no readable file; a file whose
      suffix is not one of SUFFIXES.
  """
  if isinstance(inputs, str):
    inputs = [inputs]
  if not inputs:
    raise ValueError("no input files given: pass files, directories or glob patterns")
  files = set()
  for pattern in map(os.path.expanduser, inputs):
    if os.path.isdir(pattern):
      found = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
               if os.path.isfile(p) and _format(p)]
      if not found:
        raise ValueError(f"no files matched the pattern {pattern!r}: the directory holds no "
                         f"{', '.join(SUFFIXES)} files")
    elif os.path.isfile(pattern):
      if not _format(pattern):
        raise ValueError(f"unsupported input file {pattern!r}; supported: {', '.join(SUFFIXES)}")
      found = [pattern]
    else:
      found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
      if not found:
        raise ValueError(f"no files matched the pattern {pattern!r}")
      bad = [p for p in found if not _format(p)]
      if bad:
        raise ValueError(f"the pattern {pattern!r} matched unsupported file {bad[0]!r}; "
                         f"supported: {', '.join(SUFFIXES)}")
    files.update(os.path.abspath(p) for p in found)
  return sorted(files)


def read_parquet_field(path: str, field: str = "text") -> Iterator[str]:
  """The string column `field` of a parquet file, row by row (read by record batch)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pf = pq.ParquetFile(path)
  names = pf.schema_arrow.names
  if field not in names:
    raise ValueError(f"{path}: a parquet file without a {field!r} column (columns: {names})")
  column = pf.schema_arrow.field(field)
  if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
    raise ValueError(f"{path}: column {field!r} has type {column.type}, expected a string")
  row = 0
  for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
    for text in batch.column(0).to_pylist():
      if text is None:
        raise ValueError(f"{path}: row {row} has a null {field!r}")
      row += 1
      yield text


def read_jsonl_field(path: str, field: str = "text") -> Iterator[str]:
  """The string field `field` of each line of a jsonl (or jsonl.gz) file; blank lines skipped."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not a JSON line ({e})") from e
      if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{path}:{line_no}: a jsonl line without a {field!r} field")
      if not isinstance(record[field], str):
        raise ValueError(f"{path}:{line_no}: {field!r} is a {type(record[field]).__name__}, "
                         f"expected a string")
      yield record[field]


def _read_txt(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    yield f.read()


_READERS = {".parquet": read_parquet_field, ".jsonl": read_jsonl_field,
            ".jsonl.gz": read_jsonl_field, ".txt": _read_txt}


def read_documents(files: Sequence[str]) -> Iterator[str]:
  """The documents of `files` (as given by `list_files`), file by file, in file order."""
  for path in files:
    fmt = _format(path)
    if fmt is None:
      raise ValueError(f"unsupported input file {path!r}; supported: {', '.join(SUFFIXES)}")
    yield from _READERS[fmt](path)


def heldout_score(text: str, seed: int) -> float:
  """u in [0, 1): uniform over documents, a function of (seed, text) only (see the module doc)."""
  key = int(seed).to_bytes(8, "little", signed=False)
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def is_heldout(text: str, seed: int, heldout_fraction: float) -> bool:
  """Whether the document `text` belongs to the "valid" split."""
  return heldout_score(text, seed) < heldout_fraction


# ---------------------------------------------------------------------------------------------
# Writing packed blocks.


class _SplitWriter:
  """Packs one split's token stream into blocks and writes them to numbered shards."""

  def __init__(self, directory: str, split: str, seq_length: int, dtype: np.dtype,
               vocab_size: int, eos_id: int, blocks_per_shard: int):
    self.directory, self.split, self.eos_id = directory, split, eos_id
    self.seq_length, self.dtype, self.blocks_per_shard = seq_length, dtype, blocks_per_shard
    self.pending: list[np.ndarray] = []
    self.pending_len = 0
    self.documents = self.tokens = self.blocks = 0
    self.counts = np.zeros(vocab_size, np.int64)
    self.shards: list[str] = []  # Temporary names; renamed with the shard count at the end.
    self._writer = None

  def add(self, ids: np.ndarray) -> None:
    self.documents += 1
    self.tokens += len(ids)
    self.pending.append(ids)
    self.pending_len += len(ids)
    if self.pending_len >= 64 * self.seq_length:
      self._flush(final=False)

  def _flush(self, final: bool) -> None:
    stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
    n_full = len(stream) // self.seq_length
    rest = stream[n_full * self.seq_length:]
    blocks = stream[:n_full * self.seq_length].reshape(n_full, self.seq_length)
    # Counted here, per flush, not per document: a bincount over the vocabulary per document
    # would cost more than the tokenizer on short documents.
    self.counts += np.bincount(stream if final else blocks.reshape(-1), minlength=len(self.counts))
    if final and len(rest):
      pad = np.full(self.seq_length - len(rest), self.eos_id, self.dtype)
      blocks = np.concatenate([blocks, np.concatenate([rest, pad])[None]])
      rest = rest[:0]
    for block in blocks:
      self._write(block)
    self.pending, self.pending_len = ([rest], len(rest)) if len(rest) else ([], 0)

  def _write(self, block: np.ndarray) -> None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._writer is None:
      path = os.path.join(self.directory, f"{self.split}-{len(self.shards):05d}.partial")
      # group_size:1: every record is its own chunk, so random access decodes one block only.
      self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      self.shards.append(path)
    self._writer.write(block.astype(self.dtype).tobytes())
    self.blocks += 1
    if self.blocks % self.blocks_per_shard == 0:
      self._writer.close()
      self._writer = None

  def finish(self) -> list[str]:
    """Writes the last (padded) block, closes the shard, names shards NNNNN-of-MMMMM."""
    self._flush(final=True)
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    names = []
    for i, path in enumerate(self.shards):
      name = f"{self.split}-{i:05d}-of-{len(self.shards):05d}.array_record"
      os.rename(path, os.path.join(self.directory, name))
      names.append(name)
    return names


def _entropy_bits(counts: np.ndarray) -> float:
  p = counts[counts > 0] / max(1, counts.sum())
  return float(-(p * np.log2(p)).sum())


def prepare_documents(name: str, inputs: Sequence[str], data_dir: str, *, tokenizer: str = "gpt2",
                      seq_length: int = 1024, heldout_fraction: float = 0.005, seed: int = 0,
                      blocks_per_shard: int = 10000, progress: bool = True) -> dict[str, Any]:
  """Reads, splits, tokenizes and packs a document corpus into data_dir/<name>/ (module doc).

  An existing data_dir/<name> is replaced only once the new one is complete.

  Args:
    name: the dataset's directory name, e.g. "openwebtext" or "fineweb_edu".
    inputs: files, directories or glob patterns of .parquet / .jsonl / .jsonl.gz / .txt files.
    data_dir: the directory that holds prepared datasets.
    tokenizer: a `tokenizers.get_tokenizer` spec: "gpt2", "bpe:DIR" (its absolute path is recorded,
      not a copy of its files) or "sentencepiece:PATH" (copied beside the data).
    seq_length: tokens per block (= per training example).
    heldout_fraction: expected fraction of documents in the "valid" split, in [0, 1).
    seed: the held-out split's hash key, a non-negative integer < 2^64.
    blocks_per_shard: blocks per ArrayRecord file.
    progress: show a tqdm bar over documents.

  Returns:
    The meta written to meta.json.
  """
  if not name or os.sep in name or name.startswith("."):
    raise ValueError(f"dataset name {name!r} must be a plain directory name")
  if seq_length < 1:
    raise ValueError(f"seq_length must be positive, got {seq_length}")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  if not 0 <= seed < 2**64:
    raise ValueError(f"seed must be in [0, 2^64), got {seed}")
  if blocks_per_shard < 1:
    raise ValueError(f"blocks_per_shard must be positive, got {blocks_per_shard}")
  files = list_files(inputs)
  tok = tokenizers.get_tokenizer(tokenizer)
  vocab_size, eos_id = tok.vocab_size, tok.eos_id
  dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")
  tok.encode("")  # Loads the tokenizer now: an unavailable one fails before anything is written.

  os.makedirs(data_dir, exist_ok=True)
  final_dir = os.path.join(data_dir, name)
  # Hidden, and named so that nothing mistakes it for a dataset; os.makedirs keeps the umask's
  # permissions (tempfile.mkdtemp would make the dataset readable by its owner only).
  tmp_dir = os.path.join(data_dir, f".{name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp_dir)
  try:
    writers = {s: _SplitWriter(tmp_dir, s, seq_length, dtype, vocab_size, eos_id, blocks_per_shard)
               for s in SPLITS}
    skipped = 0
    bar = tqdm.tqdm(desc=f"prepare {name}", unit="doc", disable=not progress, smoothing=0.05)

    def encode(texts: list[str]) -> None:
      for text, ids in zip(texts, tok.encode_batch(texts)):
        ids = np.asarray(ids + [eos_id], dtype=np.int64)
        split = "valid" if is_heldout(text, seed, heldout_fraction) else "train"
        writers[split].add(ids.astype(dtype))
      bar.update(len(texts))

    batch = []
    for text in read_documents(files):
      if not text:
        skipped += 1
        continue
      batch.append(text)
      if len(batch) == _ENCODE_BATCH:
        encode(batch)
        batch = []
    if batch:
      encode(batch)
    bar.close()

    if writers["train"].tokens == 0:
      raise ValueError(f"no training documents in {len(files)} input files ({files[:3]}...)")
    splits = {}
    for s, w in writers.items():
      shards = w.finish()
      splits[s] = {"documents": w.documents, "tokens": w.tokens, "blocks": w.blocks,
                   "shards": shards}
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "tokenizer": tok.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "seq_length": seq_length,
        "dtype": dtype.name,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "splits": splits,
        "empty_documents_skipped": skipped,
        "train_unigram_entropy_bits": _entropy_bits(writers["train"].counts),
        "source_files": files,
    }
    if isinstance(tok, tokenizers.SentencePieceTokenizer):
      shutil.copyfile(tok.path, os.path.join(tmp_dir, _SPM_COPY))
      meta["tokenizer_file"] = _SPM_COPY
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    # meta.json is written last, and the directory appears under its name only when complete.
    if os.path.exists(final_dir):
      old = os.path.join(data_dir, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
      os.rename(final_dir, old)
      os.rename(tmp_dir, final_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp_dir, final_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return meta


# ---------------------------------------------------------------------------------------------
# Loading.


def _meta_tokenizer(meta: dict, directory: str) -> tokenizers.Tokenizer:
  if "tokenizer_file" in meta:  # A SentencePiece model copied beside the data.
    return tokenizers.get_tokenizer("sentencepiece:" + os.path.join(directory,
                                                                    meta["tokenizer_file"]))
  return tokenizers.get_tokenizer(meta["tokenizer"])


def prepared_tokenizer(data_dir: str, name: str) -> tokenizers.Tokenizer | None:
  """The tokenizer dataset `name` was prepared with in data_dir, or None if it is not prepared."""
  directory = os.path.join(data_dir, name)
  meta_path = os.path.join(directory, "meta.json")
  if not data_dir or not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    return _meta_tokenizer(json.load(f), directory)


class PackedBlocks(base.Dataset):
  """Blocks written by `prepare_documents`, read by random access through grain.

  Training record r is training block r; the stream (`base`) sees every block once per epoch, the
  padded last one included.
  Evaluation scores every real token of the "valid" split once: its full blocks in order
  (`eval_example`), then the real tokens of a padded last block as one shorter sequence
  (`eval_tail`); padding is never scored. "test" is an alias of "valid" (the dumps have no test
  split).
  """

  def __init__(self, data_dir: str, name: str, seq_length: int):
    self.directory = os.path.join(data_dir, name)
    meta_path = os.path.join(self.directory, "meta.json")
    if not os.path.isfile(meta_path):
      raise ValueError(f"dataset {name} is not prepared in {data_dir}: run "
                       f"`md4 prepare {name} --data_dir={data_dir} --source=FILES`")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path} has format version {self.meta.get('format_version')}, this "
                       f"code reads {FORMAT_VERSION}: prepare {name} again")
    if self.meta["seq_length"] != seq_length:
      raise ValueError(f"dataset {name} in {data_dir} was prepared with seq_length "
                       f"{self.meta['seq_length']}, but seq_length {seq_length} was asked for: "
                       f"change the config or prepare it again")
    self.seq_length = seq_length
    self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
    self.tokenizer = _meta_tokenizer(self.meta, self.directory)
    self.name = name
    self.spec = base.DatasetSpec(self.meta["vocab_size"], (seq_length,), "text", "token")
    self._sources = {}
    for split in SPLITS:
      info = self.meta["splits"][split]
      paths = [os.path.join(self.directory, s) for s in info["shards"]]
      missing = [p for p in paths if not os.path.isfile(p)]
      if missing:
        raise ValueError(f"dataset {name} in {data_dir} lacks shard {missing[0]}: prepare it again")
      source = grain.sources.ArrayRecordDataSource(paths) if paths else None
      if source is not None and len(source) != info["blocks"]:
        raise ValueError(f"{self.directory}: {split} shards hold {len(source)} blocks, meta.json "
                         f"says {info['blocks']}: prepare it again")
      self._sources[split] = source
    self.num_train_blocks = self.meta["splits"]["train"]["blocks"]

  def _read(self, split: str, blocks: np.ndarray) -> np.ndarray:
    source = self._sources[split]
    keys = [int(b) for b in blocks]
    records = source.__getitems__(keys) if keys else []
    nbytes = self.seq_length * self.dtype.itemsize
    for key, record in zip(keys, records):
      if len(record) != nbytes:
        raise ValueError(f"{self.directory}: {split} block {key} has {len(record)} bytes, "
                         f"expected {nbytes}: the shards are damaged, prepare them again")
    out = np.frombuffer(b"".join(records), self.dtype).reshape(len(keys), self.seq_length)
    return out.astype(np.int32)

  def num_train_records(self):
    return self.num_train_blocks

  def read_train(self, index):
    return {"x": self._read("train", index)}

  def _shard_of(self, split: str, block: int) -> tuple[str, int]:
    """(absolute path of the shard holding `block` of the split, the block's record in it)."""
    record = block
    for name in self.meta["splits"][split]["shards"]:
      path = os.path.abspath(os.path.join(self.directory, name))
      n = len(grain.sources.ArrayRecordDataSource([path]))
      if record < n:
        return path, record
      record -= n
    raise ValueError(f"{split} block {block} is past the end of {self.directory}'s shards")

  def describe_example(self, split, source_index):
    if split != "train":
      split = self._eval_split(split)
    path, record = self._shard_of(split, int(source_index))
    start = int(source_index) * self.seq_length
    return (f"{self.name} {split} block {source_index} ({path}, record {record}; tokens "
            f"[{start}, {start + self.seq_length}) of the {split} split)")

  def _eval_split(self, split: str) -> str:
    if split not in ("valid", "test"):
      raise ValueError(f"unknown evaluation split {split!r}; valid: valid, test (an alias of "
                       f"valid)")
    if self._sources["valid"] is None:
      raise ValueError(f"{self.directory} has no held-out blocks (heldout_fraction="
                       f"{self.meta['heldout_fraction']}): prepare it with a larger one")
    return "valid"

  def num_eval_examples(self, split):
    """The number of full (unpadded) blocks of the split."""
    return self.meta["splits"][self._eval_split(split)]["tokens"] // self.seq_length

  def eval_example(self, split, index):
    """{"x": int32[n, seq_length]}: full blocks `index` (int64[n] in [0, num_eval_examples))."""
    split = self._eval_split(split)
    index = np.asarray(index, np.int64)
    n = self.num_eval_examples(split)
    if index.size and (index.min() < 0 or index.max() >= n):
      raise ValueError(f"{split} index out of range [0, {n}): {index.min()}..{index.max()}")
    return {"x": self._read(split, index)}

  def eval_tail(self, split):
    """{"x": int32[1, r]}: the r < seq_length real tokens of the padded last block, if any."""
    split = self._eval_split(split)
    full, rest = divmod(self.meta["splits"][split]["tokens"], self.seq_length)
    if not rest:
      return None
    return {"x": self._read(split, np.array([full]))[:, :rest]}

  def baseline(self):
    return (self.meta["train_unigram_entropy_bits"],
            "unigram entropy of the training tokens (EOS included)")

  def decoding(self):
    return {"tokenizer": self.tokenizer.name}

  def decode(self, x):
    ids = np.asarray(x).reshape(-1)
    bad = np.flatnonzero((ids < 0) | (ids >= self.spec.vocab_size))
    if bad.size:
      raise ValueError(f"id {int(ids[bad[0]])} at position {int(bad[0])} is outside the "
                       f"vocabulary [0, {self.spec.vocab_size})")
    return self.tokenizer.decode(ids.tolist())
