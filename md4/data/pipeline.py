"""Datasets behind one interface: what a trainer and an evaluator need, and nothing else.

Every dataset is deterministic in (seed, global example index): the training stream's state is one
integer, the index of the next example, so it is saved with the model and a resumed run sees exactly
the batches it would have seen. Each process draws only its own slice of every global batch.
Evaluation covers every example of a split once; the last batch is padded, with weight 0 on the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import math
from typing import Any, Callable, Iterator

import grain
import numpy as np
from absl import flags

from md4.config import DataConfig
from md4.data import demo, text8

# "x": int32[B, *S]; "label": int32[B] (class-conditional data); for evaluation also
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


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective, well-mixed hash of uint64 counters."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _hash(seed: int, index: np.ndarray, salt: int = 0) -> np.ndarray:
  with np.errstate(over="ignore"):
    key = _mix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt))
    return _mix64(key ^ index.astype(np.uint64))


class _StepBatch:
  """step -> this process's slice of global batch `step` (a picklable function for grain workers)."""

  def __init__(self, example_fn: Callable[[np.ndarray], Batch], global_batch: int, local: int,
               offset: int):
    self.example_fn, self.global_batch, self.local, self.offset = (
        example_fn, global_batch, local, offset)

  def __call__(self, step: int) -> Batch:
    start = step * self.global_batch + self.offset
    return self.example_fn(np.arange(start, start + self.local, dtype=np.int64))


class TrainIterator:
  """This process's slice of each global batch, drawn by `example_fn(indices) -> Batch`.

  A grain pipeline over step numbers: with num_workers > 0 batches are made in worker processes and
  prefetched. Its state is the next step's first example index (batches are deterministic in it).
  """

  def __init__(self, example_fn: Callable[[np.ndarray], Batch], global_batch: int,
               process_index: int = 0, process_count: int = 1, num_workers: int = 0):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
    self._global = global_batch
    self._num_workers = num_workers
    self._make = _StepBatch(example_fn, global_batch, global_batch // process_count,
                            process_index * (global_batch // process_count))
    self._start(0)

  def _start(self, step: int) -> None:
    self._step = step
    ds = grain.MapDataset.range(step, 2**62).map(self._make).to_iter_dataset(
        grain.ReadOptions(num_threads=0))
    if self._num_workers:
      if not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app (a notebook, pytest) nobody
        # parsed them, and their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    self._iter = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    self._step += 1
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._step * self._global, "global_batch": self._global}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["global_batch"] != self._global:
      raise ValueError(f"the saved data stream used global batch {state['global_batch']}, this run "
                       f"uses {self._global}; resuming would not replay the same examples")
    self._start(int(state["next_index"]) // self._global)


def eval_batches(num_examples: int, example_fn: Callable[[np.ndarray], Batch], global_batch: int,
                 process_index: int = 0, process_count: int = 1,
                 tail: Batch | None = None) -> Iterator[Batch]:
  """Every example once, in order; padding (a repeat of example 0) has weight 0.

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
  """A loaded dataset. Subclasses define the examples; iteration and sharding live here."""

  spec: DatasetSpec

  def train_example(self, seed: int, index: np.ndarray) -> Batch:
    raise NotImplementedError

  def eval_example(self, split: str, index: np.ndarray) -> Batch:
    raise NotImplementedError

  def num_eval_examples(self, split: str) -> int:
    raise NotImplementedError

  def eval_tail(self, split: str) -> Batch | None:
    """The split's remainder that does not fill a whole example, as a batch of one, if any."""
    del split
    return None

  def baseline(self) -> tuple[float, str] | None:
    """A reference number in bits per token for reports, with what it is."""
    return None

  def train_iterator(self, global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1, num_workers: int = 0) -> TrainIterator:
    return TrainIterator(functools.partial(self.train_example, seed), global_batch, process_index,
                         process_count, num_workers)

  def eval_iterator(self, split: str, global_batch: int, process_index: int = 0,
                    process_count: int = 1, max_examples: int = 0) -> Iterator[Batch]:
    """Every example of the split once (the first max_examples only, without the tail, if set)."""
    n = self.num_eval_examples(split)
    tail = self.eval_tail(split)
    if max_examples and max_examples < n + (tail is not None):
      n, tail = min(n, max_examples), None
    return eval_batches(n, functools.partial(self.eval_example, split), global_batch,
                        process_index, process_count, tail)

  def decode(self, x: np.ndarray) -> Any:
    """One example back to its natural form: a string for text, uint8[H, W, C] for images."""
    if self.spec.kind == "text":
      return text8.decode(x) if self.spec.vocab_size == text8.VOCAB_SIZE else " ".join(map(str, x))
    return np.asarray(x, np.uint8)


class CharCorpus(Dataset):
  """A character corpus in text8 ids: random windows for training, consecutive chunks to evaluate.

  Evaluation scores every character exactly once: floor(len / seq_length) full chunks, then the last
  len % seq_length characters as one shorter sequence.
  """

  def __init__(self, splits: text8.Text8Splits, seq_length: int):
    self.splits = splits
    self.seq_length = seq_length
    self.spec = DatasetSpec(text8.VOCAB_SIZE, (seq_length,), "text", "char")
    if len(splits.train) <= seq_length:
      raise ValueError(f"seq_length {seq_length} exceeds the training split ({len(splits.train)})")

  def _split(self, split: str) -> np.ndarray:
    if split not in ("train", "valid", "test"):
      raise ValueError(f"unknown split {split!r}; valid: train, valid, test")
    return getattr(self.splits, split)

  def train_example(self, seed, index):
    starts = _hash(seed, index) % np.uint64(len(self.splits.train) - self.seq_length + 1)
    windows = starts.astype(np.int64)[:, None] + np.arange(self.seq_length)
    return {"x": self.splits.train[windows].astype(np.int32)}

  def num_eval_examples(self, split):
    return len(self._split(split)) // self.seq_length

  def eval_example(self, split, index):
    windows = index[:, None] * self.seq_length + np.arange(self.seq_length)
    return {"x": self._split(split)[windows].astype(np.int32)}

  def eval_tail(self, split):
    ids = self._split(split)
    rest = len(ids) % self.seq_length
    return {"x": np.asarray(ids[len(ids) - rest:], np.int32)[None]} if rest else None

  def baseline(self):
    return demo.unigram_entropy_bits(self.splits.train), "unigram entropy of the training split"


class ImageSet(Dataset):
  """Images uint8[N, H, W, C] with labels; training walks a fresh permutation each epoch."""

  def __init__(self, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               num_classes: int):
    self.train_images, self.train_labels = train
    self.test_images, self.test_labels = test
    self.spec = DatasetSpec(256, self.train_images.shape[1:], "image", "dim", num_classes)

  @functools.lru_cache(maxsize=2)
  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(len(self.train_images))

  def train_example(self, seed, index):
    n = len(self.train_images)
    epochs, pos = index // n, index % n
    idx = np.array([self._permutation(seed, int(e))[p] for e, p in zip(epochs, pos)])
    return {"x": self.train_images[idx].astype(np.int32),
            "label": self.train_labels[idx].astype(np.int32)}

  def num_eval_examples(self, split):
    if split not in ("valid", "test"):
      raise ValueError(f"unknown evaluation split {split!r}; valid: valid, test (the same images)")
    return len(self.test_images)

  def eval_example(self, split, index):
    return {"x": self.test_images[index].astype(np.int32),
            "label": self.test_labels[index].astype(np.int32)}

  def baseline(self):
    return (demo.unigram_entropy_bits(self.train_images),
            "entropy of the training pixel-value histogram")


class SyntheticDataset(Dataset):
  """Uniformly random tokens of a given spec: for tests and benchmarks, which need no files."""

  def __init__(self, spec: DatasetSpec, num_eval_examples: int = 64):
    self.spec = spec
    self._num_eval = num_eval_examples

  def _examples(self, seed, index, salt):
    positions = np.arange(self.spec.tokens_per_example, dtype=np.uint64)
    counters = index.astype(np.uint64)[:, None] * np.uint64(self.spec.tokens_per_example) + positions
    x = (_hash(seed, counters, salt) % np.uint64(self.spec.vocab_size)).astype(np.int32)
    batch = {"x": x.reshape((len(index),) + self.spec.example_shape)}
    if self.spec.num_classes:
      batch["label"] = (_hash(seed, index, salt + 1) % np.uint64(self.spec.num_classes)).astype(
          np.int32)
    return batch

  def train_example(self, seed, index):
    return self._examples(seed, index, salt=0)

  def num_eval_examples(self, split):
    return self._num_eval

  def eval_example(self, split, index):
    return self._examples(12345, index, salt=7)


def _document_spec(cfg: DataConfig) -> DatasetSpec:
  """GPT-2's vocabulary, or the one a prepared dataset records (a SentencePiece model's)."""
  meta = os.path.join(cfg.data_dir, cfg.dataset, "meta.json") if cfg.data_dir else ""
  vocab = 50257
  if meta and os.path.exists(meta):
    with open(meta) as f:
      vocab = json.load(f)["vocab_size"]
  return DatasetSpec(vocab, (cfg.seq_length,), "text", "token")


SPECS: dict[str, Callable[[DataConfig], DatasetSpec]] = {
    "shakespeare": lambda cfg: DatasetSpec(text8.VOCAB_SIZE, (cfg.seq_length,), "text", "char"),
    "text8": lambda cfg: DatasetSpec(text8.VOCAB_SIZE, (cfg.seq_length,), "text", "char"),
    "openwebtext": _document_spec,
    "fineweb_edu": _document_spec,
    "mnist": lambda cfg: DatasetSpec(256, (28, 28, 1), "image", "dim", 10),
    "cifar10": lambda cfg: DatasetSpec(256, (32, 32, 3), "image", "dim", 10),
    "imagenet64": lambda cfg: DatasetSpec(256, (64, 64, 3), "image", "dim", 0),
    "imagenet64_resized": lambda cfg: DatasetSpec(256, (64, 64, 3), "image", "dim", 1000),
}


def _load_shakespeare(cfg: DataConfig) -> Dataset:
  return CharCorpus(demo.load_shakespeare(), cfg.seq_length)


def _load_mnist(cfg: DataConfig) -> Dataset:
  del cfg
  splits = demo.load_mnist_splits()
  return ImageSet((splits.train.images[..., None], splits.train.labels),
                  (splits.test.images[..., None], splits.test.labels), 10)


def _load_text8(cfg: DataConfig) -> Dataset:
  return CharCorpus(text8.read_prepared(_data_dir(cfg)), cfg.seq_length)


def _data_dir(cfg: DataConfig) -> str:
  if not cfg.data_dir:
    raise ValueError(f"dataset {cfg.dataset!r} needs data.data_dir: the directory given to "
                     f"`md4 prepare {cfg.dataset} --data_dir=DIR`")
  return cfg.data_dir


def _load_documents(cfg: DataConfig) -> Dataset:
  from md4.data import documents  # It imports this module.
  return documents.PackedBlocks(_data_dir(cfg), cfg.dataset, cfg.seq_length)


def _load_images(cfg: DataConfig) -> Dataset:
  from md4.data import images  # It imports this module.
  return images.TfdsImages(cfg.dataset, _data_dir(cfg))


LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "shakespeare": _load_shakespeare,
    "mnist": _load_mnist,
    "text8": _load_text8,
    "openwebtext": _load_documents,
    "fineweb_edu": _load_documents,
    "cifar10": _load_images,
    "imagenet64": _load_images,
    "imagenet64_resized": _load_images,
}


def get_spec(cfg: DataConfig) -> DatasetSpec:
  if cfg.dataset not in SPECS:
    raise ValueError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(SPECS)}")
  return SPECS[cfg.dataset](cfg)


def load(cfg: DataConfig) -> Dataset:
  """The dataset named by cfg.dataset, loaded."""
  get_spec(cfg)
  if cfg.dataset not in LOADERS:
    raise ValueError(f"dataset {cfg.dataset!r} has no loader; valid: {', '.join(LOADERS)}")
  return LOADERS[cfg.dataset](cfg)
