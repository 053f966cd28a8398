"""The dataset interface, and the grain streams that every dataset is read through.

A dataset's training split is a list of records (character windows, images, token blocks) read by
record index. Its training stream is one grain MapDataset over those indices:

  range(N).seed(seed).shuffle().repeat().batch(L, drop_remainder=True)[p::P].map(read)

grain's shuffle combines its seed with the epoch number when `repeat` asks for an index past N, so
every epoch visits each record once, in a new order. Batching to the local batch L = G / P (G the
global batch, P the process count) and keeping batches p, p + P, p + 2P, ... gives process p, at
step b, stream positions [b G + p L, b G + (p + 1) L): the processes' local batches, concatenated
in process order, are the one-process global batch. The iterator's state is grain's own, so a
resumed run reads exactly the batches it would have read.

Evaluation covers every example of a split once, in order; the last batch is padded, with weight 0
on the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Protocol

import grain
import numpy as np
from absl import flags

from md4.data import pixels

# "x": int32[B, *S]; "label": int32[B] (class-conditional data). Training batches also carry
# "source_index": int64[B] (the record each row was read from); evaluation batches carry
# "weight": float32[B] (0 on padding) and "index": int32[B] (the example's position in the split).
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model must agree with: vocabulary, example shape, classes."""
  vocab_size: int
  example_shape: tuple[int, ...]
  kind: str  # "text" or "image".
  unit: str  # What one token is called in reports: "char", "token" or "dim".
  num_classes: int = 0

  @property
  def tokens_per_example(self) -> int:
    return math.prod(self.example_shape)


class Decodes(Protocol):
  """What samples are written and judged with: a Dataset, or a model's md4.standalone.Decoder."""
  spec: DatasetSpec
  name: str  # The dataset's name ("mnist", "text8", ...).

  def decode(self, x: np.ndarray) -> Any:
    """One example as text, or as uint8[H, W, C] pixel values."""


def _read_records(dataset: Dataset, index: np.ndarray) -> Batch:
  """One local batch: the records `index` (int64[L]), with "source_index" = index."""
  index = np.asarray(index, np.int64)
  batch = dataset.read_train(index)
  batch["source_index"] = index
  return batch


# What a saved stream must agree on with the run resuming it, beside grain's state: with any other
# value the same grain state names other examples (or, for the workers, cannot be read at all).
_STREAM_KEYS = (("global_batch", "global batch"), ("process_count", "process count"),
                ("seed", "seed"), ("num_records", "number of training records"),
                ("num_workers", "number of loader workers (data.num_workers)"))


class TrainIterator:
  """This process's slice of every global batch of `dataset`'s training stream (module doc).

  `next` returns the dataset's records with "source_index": int64[L]; with num_workers > 0 the
  batches are read by that many grain worker processes, which read ahead.
  `get_state()` is a JSON-serialisable dict: grain's iterator state under "grain", and the stream's
  settings beside it, which `set_state` checks against this iterator's.
  """

  def __init__(self, dataset: Dataset, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, num_workers: int = 0):
    if global_batch < 1 or process_count < 1 or global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    if seed < 0:
      raise ValueError(f"the data seed must be non-negative, got {seed}")
    num_records = dataset.num_train_records()
    if num_records < 1:
      raise ValueError(f"{dataset.name} has no training records")
    self._settings = {"global_batch": global_batch, "process_count": process_count,
                      "seed": int(seed), "num_records": num_records, "num_workers": num_workers}
    local = global_batch // process_count
    # `seed` derives the shuffle's own seed (grain's SeedSequence), so runs with seeds s and s + 1
    # do not share epochs, as they would if s were the shuffle's seed (it adds the epoch to it).
    # drop_remainder: the repeated stream has no remainder to drop, and grain then computes the
    # number of batches in integers (without it, a float rounds sys.maxsize / 1 past sys.maxsize).
    stream = (grain.MapDataset.range(num_records).seed(seed).shuffle().repeat()
              .batch(local, drop_remainder=True)[process_index::process_count]
              .map(functools.partial(_read_records, dataset)))
    # num_threads=0: each batch is read when asked for, in this process or in a worker.
    ds = stream.to_iter_dataset(grain.ReadOptions(num_threads=0))
    if num_workers:
      if not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app (a notebook, pytest) nobody
        # parsed them, and their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self._iter = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return next(self._iter)

  def close(self) -> None:
    """Stops the worker processes now, rather than when the iterator is garbage collected."""
    self._iter.close()

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._iter.get_state(), **self._settings}

  def set_state(self, state: dict[str, Any]) -> None:
    if "grain" not in state:
      raise ValueError(f"the saved data stream state has keys {sorted(state)}, not a grain "
                       f"stream's: it was written by an older md4")
    for key, what in _STREAM_KEYS:
      if state.get(key) != self._settings[key]:
        raise ValueError(f"the saved data stream used {what} {state.get(key)}, this run uses "
                         f"{self._settings[key]}; resuming would not replay the same examples")
    self._iter.set_state(state["grain"])


def eval_batches(num_examples: int, example_fn, global_batch: int, process_index: int = 0,
                 process_count: int = 1, tail: Batch | None = None) -> Iterator[Batch]:
  """Every example once, in order; padding (a repeat of example 0) has weight 0.

  example_fn: int64[n] example indices -> Batch of n examples.
  tail: one shorter example (the end of a split that does not fill a whole example) given as its
  own last batch, padded with weight-0 copies of itself; its index is num_examples.
  """
  local = global_batch // process_count
  for start in range(0, num_examples, global_batch):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = idx < num_examples
    batch = example_fn(np.where(valid, idx, 0))
    batch["weight"] = valid.astype(np.float32)
    batch["index"] = idx.astype(np.int32)
    yield batch
  if tail is not None:
    batch = {k: np.repeat(v, local, axis=0) for k, v in tail.items()}
    batch["weight"] = np.zeros(local, np.float32)
    batch["weight"][0] = float(process_index == 0)
    batch["index"] = np.full(local, num_examples, np.int32)
    yield batch


class Dataset:
  """A loaded dataset. Subclasses define the records; streams and sharding live here.

  A subclass sets `spec` and `name` (the config's dataset name, e.g. "text8") and defines the
  training records (`num_train_records`, `read_train`, `describe_example`) and, if it can be
  evaluated, the evaluation examples (`num_eval_examples`, `eval_example`, `eval_tail`).
  """

  spec: DatasetSpec
  name: str

  def num_train_records(self) -> int:
    """N: the training stream walks records 0..N-1, in a new order each epoch."""
    raise NotImplementedError(f"{type(self).__name__} has no training split")

  def read_train(self, index: np.ndarray) -> Batch:
    """index: int64[n] training record ids in [0, N) -> {"x": int32[n, *S], ("label": int32[n])}."""
    raise NotImplementedError(f"{type(self).__name__} has no training split")

  def describe_example(self, split: str, source_index: int) -> str:
    """Where an example came from: the dataset, the file or shard, and its index there.

    For "train", source_index is a training record id (a batch's "source_index"); for an
    evaluation split, an example index (an evaluation batch's "index").
    """
    raise NotImplementedError(f"{type(self).__name__} does not describe its examples")

  def eval_example(self, split: str, index: np.ndarray) -> Batch:
    raise NotImplementedError(f"{type(self).__name__} has no evaluation split")

  def num_eval_examples(self, split: str) -> int:
    raise NotImplementedError(f"{type(self).__name__} has no evaluation split")

  def eval_tail(self, split: str) -> Batch | None:
    """The split's remainder that does not fill a whole example, as a batch of one, if any."""
    del split
    return None

  def baseline(self) -> tuple[float, str] | None:
    """A reference number in bits per token for reports, with what it is."""
    return None

  def train_iterator(self, global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1, num_workers: int = 0) -> TrainIterator:
    return TrainIterator(self, global_batch, seed, process_index, process_count, num_workers)

  def eval_iterator(self, split: str, global_batch: int, process_index: int = 0,
                    process_count: int = 1, max_examples: int = 0) -> Iterator[Batch]:
    """Every example of the split once (the first max_examples only, without the tail, if set)."""
    n = self.num_eval_examples(split)
    tail = self.eval_tail(split)
    if max_examples and max_examples < n + (tail is not None):
      n, tail = min(n, max_examples), None
    return eval_batches(n, functools.partial(self.eval_example, split), global_batch,
                        process_index, process_count, tail)

  def decoding(self) -> dict[str, Any]:
    """How this dataset's ids become text or pixels, as md4.standalone records it beside a model:
    {"pixels": levels}, {"alphabet": characters of ids 0, 1, ...}, {"tokenizer": spec of
    md4.data.tokenizers.get_tokenizer} or {"ids": None} (text printed as the ids' numbers)."""
    if self.spec.kind == "image":
      return {"pixels": self.spec.vocab_size}
    return {"ids": None}

  def decode(self, x: np.ndarray) -> Any:
    """One example back to its natural form: the ids as text, or uint8[H, W, C] pixel values for
    images (levels spread over 0..255, md4.data.pixels.to_pixels)."""
    if self.spec.kind == "text":
      return " ".join(map(str, np.asarray(x).reshape(-1)))
    return pixels.to_pixels(x, self.spec.vocab_size)
