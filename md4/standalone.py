"""What a model needs beside its parameters and config to be used anywhere: its data's spec and how
its ids decode, so that sampling, `md4 info` and zero-shot evaluation read no dataset.

A model's description is recorded in every checkpoint's meta (md4.checkpoint) and in an exported
model's config.json (md4.export), as JSON:

  {"dataset": "text8",
   "spec": {"vocab_size": 27, "example_shape": [256], "kind": "text", "unit": "char",
            "num_classes": 0},
   "decode": {"alphabet": "abcdefghijklmnopqrstuvwxyz "}}

"decode" is one of
  {"pixels": L}                       image levels 0..L-1, shown as md4.data.pixels.to_pixels does
  {"alphabet": "..."}                 id i is character i of the string
  {"tokenizer": "gpt2"}               GPT-2's BPE, by name (tiktoken; its BPE file is cached once)
  {"tokenizer": "sentencepiece", "files": {"model": "tokenizer/NAME.model"}, "sha256": {...}}
  {"tokenizer": "bpe", "files": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt"},
   "sha256": {...}}
  {"ids": null}                       no decoding known: text is printed as the ids' numbers
Tokenizer files are copies kept in the model's own directory (its workdir, or an exported
directory), named relative to it, so a directory moved or copied elsewhere still decodes.

Checkpoints written before descriptions were recorded have none; their readers take the spec and
the decoding from the config's dataset, loaded (md4.inference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from typing import Any, Mapping

import numpy as np

from md4.data import pixels, text8, tokenizers
from md4.data.base import Dataset, DatasetSpec

TOKENIZER_DIR = "tokenizer"
DECODE_KINDS = ("pixels", "alphabet", "tokenizer", "ids")


@dataclasses.dataclass(frozen=True)
class Description:
  """A model's data: the dataset's name, its spec (vocabulary, example shape, classes) and the
  decoding of its ids (the module docstring's forms)."""
  dataset: str
  spec: DatasetSpec
  decode: Mapping[str, Any]

  def to_json(self) -> dict[str, Any]:
    return {"dataset": self.dataset, "spec": {**dataclasses.asdict(self.spec),
                                              "example_shape": list(self.spec.example_shape)},
            "decode": dict(self.decode)}

  @classmethod
  def from_json(cls, record: Mapping[str, Any], where: str) -> Description:
    """The description `record` holds; `where` names it in errors (a checkpoint, a config.json)."""
    try:
      spec = dict(record["spec"])
      spec["example_shape"] = tuple(int(n) for n in spec["example_shape"])
      description = cls(str(record["dataset"]), DatasetSpec(**spec), dict(record["decode"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: the model's description is malformed ({type(e).__name__}: "
                       f"{e}); expected dataset, spec and decode as md4.standalone writes them"
                       ) from None
    kinds = [k for k in DECODE_KINDS if k in description.decode]
    if len(kinds) != 1:
      raise ValueError(f"{where}: the model's decoding {dict(description.decode)} names "
                       f"{len(kinds)} of {', '.join(DECODE_KINDS)}; it must name one")
    return description


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _tokenizer_files(tokenizer: tokenizers.Tokenizer) -> tuple[str, dict[str, str]]:
  """(kind, {role: source file}) of a tokenizer kept as files; ("gpt2", {}) for GPT-2's."""
  if isinstance(tokenizer, tokenizers.GPT2Tokenizer):
    return "gpt2", {}
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    return "sentencepiece", {"model": tokenizer.path}
  if isinstance(tokenizer, tokenizers.BPETokenizer):
    return "bpe", {"vocab": os.path.join(tokenizer.directory, "vocab.json"),
                   "merges": os.path.join(tokenizer.directory, "merges.txt")}
  raise ValueError(f"tokenizer {tokenizer.name!r} cannot be recorded with a model")


def store_tokenizer(spec: str, model_dir: str, *, write: bool = True) -> dict[str, Any]:
  """The decoding of tokenizer `spec` (md4.data.tokenizers.get_tokenizer's forms), its files copied
  into model_dir/tokenizer/ (only where `write`: one process of several writes them).

  Raises:
    ValueError: a tokenizer file that does not exist, or model_dir holding a file of that name with
      other contents (another tokenizer).
  """
  kind, sources = _tokenizer_files(tokenizers.get_tokenizer(spec))
  if not sources:
    return {"tokenizer": kind}
  files, digests = {}, {}
  for role, source in sources.items():
    if not os.path.isfile(source):
      raise ValueError(f"tokenizer file {source} does not exist")
    relative = os.path.join(TOKENIZER_DIR, os.path.basename(source))
    target = os.path.join(model_dir, relative)
    digest = _sha256(source)
    if os.path.exists(target) and _sha256(target) != digest:
      raise ValueError(f"{model_dir} already holds {relative} with other contents than {source}: "
                       "a model directory keeps one tokenizer")
    if write and not os.path.exists(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(source, target + ".tmp")
      os.replace(target + ".tmp", target)
    files[role], digests[role] = relative, digest
  return {"tokenizer": kind, "files": files, "sha256": digests}


def describe(dataset_name: str, spec: DatasetSpec, decoding: Mapping[str, Any], model_dir: str, *,
             write: bool = True) -> Description:
  """The description of a model of `spec`, with `decoding` as a Dataset's `decoding()` gives it (a
  tokenizer by its spec), the tokenizer's files stored in model_dir (where `write`)."""
  if "tokenizer" in decoding:
    decoding = store_tokenizer(decoding["tokenizer"], model_dir, write=write)
  return Description(dataset_name, spec, dict(decoding))


def describe_dataset(dataset: Dataset, model_dir: str, *, write: bool = True) -> Description:
  return describe(dataset.name, dataset.spec, dataset.decoding(), model_dir, write=write)


def copy_tokenizer_files(description: Description, source_dir: str, target_dir: str) -> None:
  """Copies the tokenizer files a description names from one model directory to another."""
  for relative in description.decode.get("files", {}).values():
    target = os.path.join(target_dir, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(os.path.join(source_dir, relative), target)


class Decoder:
  """Ids -> text or pixels, as a model's description says: what samples are written with.

  spec: the model's DatasetSpec; decode(x): one example (int[*S]) as text, or uint8[H, W, C]
  pixel values; tokenizer: the Tokenizer of a token-level model (None otherwise).
  """

  def __init__(self, description: Description, model_dir: str):
    self.description = description
    self.spec = description.spec
    self.name = description.dataset
    self.tokenizer = _tokenizer(description, model_dir)

  def decode(self, x: np.ndarray) -> Any:
    decode = self.description.decode
    if "pixels" in decode:
      return pixels.to_pixels(x, int(decode["pixels"]))
    ids = np.asarray(x).reshape(-1)
    bad = np.flatnonzero((ids < 0) | (ids >= self.spec.vocab_size))
    if bad.size:
      raise ValueError(f"id {int(ids[bad[0]])} at position {int(bad[0])} is outside the "
                       f"vocabulary [0, {self.spec.vocab_size})")
    if "alphabet" in decode:
      alphabet = decode["alphabet"]
      return "".join(alphabet[i] for i in ids)
    if self.tokenizer is not None:
      return self.tokenizer.decode(ids.tolist())
    return " ".join(map(str, ids))

  def describe_decoding(self) -> str:
    """The decoding in words, for `md4 info` and model cards."""
    decode = self.description.decode
    if "pixels" in decode:
      return f"pixels: {decode['pixels']} levels per channel"
    if "alphabet" in decode:
      alphabet = decode["alphabet"]
      return ("text8's characters (a-z and space)" if alphabet == text8.VOCAB else
              f"characters {alphabet!r}")
    if "tokenizer" in decode:
      files = ", ".join(decode.get("files", {}).values())
      return f"tokenizer {decode['tokenizer']}" + (f" ({files})" if files else "")
    return "none recorded: text shows the ids' numbers"


def _tokenizer(description: Description, model_dir: str) -> tokenizers.Tokenizer | None:
  decode = description.decode
  if "tokenizer" not in decode:
    return None
  kind, files = decode["tokenizer"], decode.get("files", {})
  for role, relative in files.items():
    path = os.path.join(model_dir, relative)
    if not os.path.isfile(path):
      raise ValueError(f"{model_dir} lacks {relative}, the tokenizer file its model records")
    expected = decode.get("sha256", {}).get(role)
    if expected and _sha256(path) != expected:
      raise ValueError(f"{path} is not the tokenizer file the model was recorded with (its sha256 "
                       "differs)")
  if kind == "gpt2":
    tokenizer = tokenizers.get_tokenizer("gpt2")
  elif kind == "sentencepiece":
    tokenizer = tokenizers.get_tokenizer("sentencepiece:" + os.path.join(model_dir,
                                                                         files["model"]))
  elif kind == "bpe":
    directory = os.path.dirname(os.path.join(model_dir, files["vocab"]))
    tokenizer = tokenizers.get_tokenizer("bpe:" + directory)
  else:
    raise ValueError(f"{model_dir}: unknown tokenizer kind {kind!r} in the model's description; "
                     "valid: gpt2, sentencepiece, bpe")
  if tokenizer.vocab_size != description.spec.vocab_size:
    raise ValueError(f"{model_dir}: the recorded tokenizer has {tokenizer.vocab_size} tokens, the "
                     f"model's data {description.spec.vocab_size}")
  return tokenizer
