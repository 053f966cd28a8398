"""The datasets by name: their specs, their loaders, and the small in-memory datasets.

The interface they share, and the grain streams behind it, live in `md4.data.base` (re-exported
here: DatasetSpec, Batch, Dataset); document corpora in `md4.data.documents`, tfds images in
`md4.data.images`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from md4.config import Config, DataConfig
from md4.data import demo, documents, images, pixels, text8
from md4.data.base import Batch, Dataset, DatasetSpec  # Also imported from here by callers.


class CharCorpus(Dataset):
  """A character corpus in text8 ids: random windows for training, consecutive chunks to evaluate.

  Training record r is the window of seq_length characters starting at character r of the
  training split: every window start, len(train) - seq_length + 1 records.
  Evaluation scores every character exactly once: floor(len / seq_length) full chunks, then the last
  len % seq_length characters as one shorter sequence.
  origins: each split's source, as `describe_example` names it (a file path, or a phrase).
  """

  def __init__(self, splits: text8.Text8Splits, seq_length: int, name: str,
               origins: dict[str, str]):
    self.splits = splits
    self.seq_length = seq_length
    self.name = name
    self.origins = origins
    self.spec = DatasetSpec(text8.VOCAB_SIZE, (seq_length,), "text", "char")
    if len(splits.train) <= seq_length:
      raise ValueError(f"seq_length {seq_length} exceeds the training split ({len(splits.train)})")

  def _split(self, split: str) -> np.ndarray:
    if split not in ("train", "valid", "test"):
      raise ValueError(f"unknown split {split!r}; valid: train, valid, test")
    return getattr(self.splits, split)

  def num_train_records(self):
    return len(self.splits.train) - self.seq_length + 1

  def read_train(self, index):
    windows = index[:, None] + np.arange(self.seq_length)
    return {"x": self.splits.train[windows].astype(np.int32)}

  def describe_example(self, split, source_index):
    if split == "train":
      return (f"{self.name} train window starting at character {source_index} of "
              f"{self.origins['train']}")
    n = len(self._split(split))
    start = source_index * self.seq_length
    return (f"{self.name} {split} chunk {source_index} (characters [{start}, "
            f"{min(start + self.seq_length, n)})) of {self.origins[split]}")

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

  def decoding(self):
    return {"alphabet": text8.VOCAB}

  def decode(self, x):
    return text8.decode(x)


class ImageSet(Dataset):
  """Images with labels, in memory, in the format the config asks for; training record r is
  training image r.

  train, test: (uint8[N, H, W, C] images, labels[N]) as the dataset has them; fmt: the model's
  format (md4.data.pixels; default the images' own, 256 levels), applied as the images are read.
  origin: where the images come from, as `describe_example` names it.
  """

  def __init__(self, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               num_classes: int, name: str, origin: str, fmt: pixels.ImageFormat | None = None):
    self.train_images, self.train_labels = train
    self.test_images, self.test_labels = test
    self.name = name
    self.origin = origin
    height, _, channels = self.train_images.shape[1:]
    self.format = fmt or pixels.ImageFormat(height, channels, pixels.MAX_LEVELS)
    self.spec = DatasetSpec(self.format.levels, self.format.shape, "image", "dim", num_classes)

  def num_train_records(self):
    return len(self.train_images)

  def read_train(self, index):
    return {"x": pixels.reformat(self.train_images[index], self.format),
            "label": self.train_labels[index].astype(np.int32)}

  def describe_example(self, split, source_index):
    kind = "train" if split == "train" else "test"
    if split != "train":
      self.num_eval_examples(split)  # Checks the name.
    return f"{self.name} {kind} image {source_index} of {self.origin}"

  def num_eval_examples(self, split):
    if split not in ("valid", "test"):
      raise ValueError(f"unknown evaluation split {split!r}; valid: valid, test (the same images)")
    return len(self.test_images)

  def eval_example(self, split, index):
    return {"x": pixels.reformat(self.test_images[index], self.format),
            "label": self.test_labels[index].astype(np.int32)}

  def baseline(self):
    return (demo.unigram_entropy_bits(pixels.reformat(self.train_images, self.format)),
            "entropy of the training pixel-value histogram")


class SyntheticDataset(Dataset):
  """Uniformly random tokens of a given spec: for tests and benchmarks, which need no files.

  Record r of a split is drawn by np.random.default_rng([salt of the split, r]): a function of r
  alone. Training has NUM_TRAIN_RECORDS records; evaluation num_eval_examples.
  """

  NUM_TRAIN_RECORDS = 2**20
  _SALTS = {"train": 0, "valid": 1, "test": 2}

  def __init__(self, spec: DatasetSpec, num_eval_examples: int = 64):
    self.spec = spec
    self.name = "synthetic"
    self._num_eval = num_eval_examples

  def _examples(self, split: str, index: np.ndarray) -> Batch:
    if split not in self._SALTS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(self._SALTS)}")
    rngs = [np.random.default_rng([self._SALTS[split], int(i)]) for i in index]
    batch = {"x": np.stack([r.integers(0, self.spec.vocab_size, self.spec.example_shape, np.int32)
                            for r in rngs]).reshape((len(index),) + self.spec.example_shape)}
    if self.spec.num_classes:
      batch["label"] = np.array([r.integers(self.spec.num_classes) for r in rngs], np.int32)
    return batch

  def num_train_records(self):
    return self.NUM_TRAIN_RECORDS

  def read_train(self, index):
    return self._examples("train", index)

  def describe_example(self, split, source_index):
    return (f"synthetic {split} example {source_index} (random tokens drawn from "
            f"np.random.default_rng([{self._SALTS[split]}, {source_index}]); no file)")

  def num_eval_examples(self, split):
    return self._num_eval

  def eval_example(self, split, index):
    return self._examples(split, index)


def _document_spec(cfg: DataConfig) -> DatasetSpec:
  """GPT-2's vocabulary, or the one a prepared dataset records (a SentencePiece model's)."""
  _check_no_image_keys(cfg)
  meta = os.path.join(cfg.data_dir, cfg.dataset, "meta.json") if cfg.data_dir else ""
  vocab = 50257
  if meta and os.path.exists(meta):
    with open(meta) as f:
      vocab = json.load(f)["vocab_size"]
  return DatasetSpec(vocab, (cfg.seq_length,), "text", "token")


def _text_spec(vocab_size: int, unit: str):
  def spec(cfg: DataConfig) -> DatasetSpec:
    _check_no_image_keys(cfg)
    return DatasetSpec(vocab_size, (cfg.seq_length,), "text", unit)
  return spec


def _check_no_image_keys(cfg: DataConfig) -> None:
  given = [f"data.{k}={getattr(cfg, k)}" for k in ("image_size", "channels", "levels")
           if getattr(cfg, k)]
  if given:
    raise ValueError(f"{', '.join(given)} applies to image datasets; {cfg.dataset!r} is text")


def _image_spec(source_shape: tuple[int, int, int], num_classes: int):
  def spec(cfg: DataConfig) -> DatasetSpec:
    fmt = pixels.image_format(cfg, source_shape)
    return DatasetSpec(fmt.levels, fmt.shape, "image", "dim", num_classes)
  return spec


def _tfds_spec(name: str):
  source = images.SOURCES[name]
  return _image_spec(source.image_shape, source.num_classes)


# The MNIST digits as they are embedded (md4/data/demo.py).
MNIST_SHAPE = (28, 28, 1)

SPECS: dict[str, Callable[[DataConfig], DatasetSpec]] = {
    "shakespeare": _text_spec(text8.VOCAB_SIZE, "char"),
    "text8": _text_spec(text8.VOCAB_SIZE, "char"),
    "openwebtext": _document_spec,
    "fineweb_edu": _document_spec,
    "mnist": _image_spec(MNIST_SHAPE, demo.MNIST_NUM_CLASSES),
    **{name: _tfds_spec(name) for name in images.SOURCES},
}


def _load_shakespeare(cfg: DataConfig) -> Dataset:
  where = f"the embedded demo data md4/data/demo/{demo.SHAKESPEARE_FILE}"
  return CharCorpus(demo.load_shakespeare(), cfg.seq_length, cfg.dataset,
                    {s: f"the {s} split of {where}" for s in text8.SPLITS})


def _load_mnist(cfg: DataConfig) -> Dataset:
  splits = demo.load_mnist_splits()
  n = len(splits.train.labels)
  origin = (f"the embedded demo data md4/data/demo/{demo.MNIST_FILE} (train: its digits "
            f"0..{n - 1}, test: its digits {n}..{n + len(splits.test.labels) - 1})")
  return ImageSet((splits.train.images[..., None], splits.train.labels),
                  (splits.test.images[..., None], splits.test.labels), demo.MNIST_NUM_CLASSES,
                  cfg.dataset, origin, pixels.image_format(cfg, MNIST_SHAPE))


def _load_text8(cfg: DataConfig) -> Dataset:
  data_dir = _data_dir(cfg)
  return CharCorpus(text8.read_prepared(data_dir), cfg.seq_length, cfg.dataset,
                    {s: os.path.abspath(text8.prepared_file(data_dir, s)) for s in text8.SPLITS})


def _data_dir(cfg: DataConfig) -> str:
  if not cfg.data_dir:
    raise ValueError(f"dataset {cfg.dataset!r} needs data.data_dir: the directory given to "
                     f"`md4 prepare {cfg.dataset} --data_dir=DIR`")
  return cfg.data_dir


def _load_documents(cfg: DataConfig) -> Dataset:
  return documents.PackedBlocks(_data_dir(cfg), cfg.dataset, cfg.seq_length)


def _load_images(cfg: DataConfig) -> Dataset:
  source = images.SOURCES[cfg.dataset]
  return images.TfdsImages(cfg.dataset, _data_dir(cfg), pixels.image_format(cfg,
                                                                            source.image_shape))


# The datasets that ship inside the package (md4/data/demo/): they load with no data.data_dir.
EMBEDDED = ("shakespeare", "mnist")

LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "shakespeare": _load_shakespeare,
    "mnist": _load_mnist,
    "text8": _load_text8,
    "openwebtext": _load_documents,
    "fineweb_edu": _load_documents,
    **{name: _load_images for name in images.SOURCES},
}


# The splits each dataset evaluates on, known without reading it (md4.checks checks eval.split).
EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "shakespeare": ("valid", "test", "train"),
    "text8": ("valid", "test", "train"),
    "openwebtext": ("valid", "test"),  # "test" is an alias of "valid" (PackedBlocks).
    "fineweb_edu": ("valid", "test"),
    "mnist": ("valid", "test"),  # The same images (ImageSet).
    # CIFAR-10: the test images; the ImageNets: the validation images (images.SOURCES).
    **{name: ("valid", "test") for name in images.SOURCES},
}


def eval_splits(cfg: DataConfig) -> tuple[str, ...]:
  get_spec(cfg)
  return EVAL_SPLITS[cfg.dataset]


def get_spec(cfg: DataConfig) -> DatasetSpec:
  if cfg.dataset not in SPECS:
    raise ValueError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(SPECS)}")
  return SPECS[cfg.dataset](cfg)


def config_spec(cfg: Config) -> DatasetSpec:
  """The spec a whole config describes, reading no data: the dataset's (`get_spec`), except that a
  token corpus not prepared in data.data_dir has the model's vocabulary (model.vocab_size less
  model.extra_tokens): whatever tokenizer the model reads, not necessarily GPT-2's."""
  spec = get_spec(cfg.data)
  if (spec.unit == "token"
      and documents.prepared_tokenizer(cfg.data.data_dir, cfg.data.dataset) is None):
    spec = dataclasses.replace(spec, vocab_size=cfg.model.vocab_size - cfg.model.extra_tokens)
  return spec


def load(cfg: DataConfig) -> Dataset:
  """The dataset named by cfg.dataset, loaded."""
  get_spec(cfg)
  if cfg.dataset not in LOADERS:
    raise ValueError(f"dataset {cfg.dataset!r} has no loader; valid: {', '.join(LOADERS)}")
  return LOADERS[cfg.dataset](cfg)
