"""Tokenizers for the document corpora (OpenWebText, FineWeb-Edu, a user's own text).

A `Tokenizer` is a small frozen value that holds only a name or a path: the BPE tables or the
SentencePiece model are loaded lazily, once per process, on first use. So a tokenizer pickles
cheaply and can be sent to grain's worker processes.

Specs accepted by `get_tokenizer`:
  "gpt2"                 GPT-2's BPE (tiktoken's "gpt2" encoding): vocab 50257,
                         EOS "<|endoftext|>" = 50256.
  "bpe:DIR"              a GPT-2-style byte-level BPE from local files: DIR holds a Hugging Face
                         tokenizer's vocab.json and merges.txt, applied by GPT-2's algorithm
                         (merges in merges.txt's order; GPT-2's own files give GPT-2's ids, with
                         no download). EOS "<|endoftext|>".
  "sentencepiece:PATH"   a SentencePiece model file, e.g. one made by `train_sentencepiece`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Iterable, Sequence

import regex  # tiktoken's own dependency: GPT-2's pattern needs Unicode classes (\p{L}).

from md4 import paths

SPEC_FORMS = ('"gpt2"', '"bpe:DIR" (vocab.json and merges.txt of a GPT-2-style tokenizer)',
              '"sentencepiece:PATH" (a SentencePiece .model file)')
EOS_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other symbols (each with one
# optional leading space), then whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The GPT-2 BPE files tiktoken fetches on first use, and where it caches them.
_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
_NUM_THREADS = max(1, min(8, os.cpu_count() or 1))


class Tokenizer(abc.ABC):
  """Text <-> token ids. Ids are in [0, vocab_size); `eos_id` ends every document."""

  @property
  @abc.abstractmethod
  def name(self) -> str:
    """The spec that `get_tokenizer` turns back into this tokenizer."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without EOS. Special-token strings in the text are ordinary text."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text; subclasses may use several threads."""
    return [self.encode(t) for t in texts]


def _gpt2_cache_names() -> str:
  return ", ".join(f"{hashlib.sha1(u.encode()).hexdigest()} (= {u})" for u in _GPT2_URLS)


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
  try:
    import tiktoken  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the gpt2 tokenizer needs tiktoken: pip install tiktoken==0.14.0") from e
  try:
    return tiktoken.get_encoding("gpt2")
  except Exception as e:  # requests' network errors, hash mismatches, unwritable caches.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    where = (f"TIKTOKEN_CACHE_DIR={cache}" if cache else
             "tiktoken's default cache (TIKTOKEN_CACHE_DIR unset)")
    raise RuntimeError(
        f"the GPT-2 BPE file could not be fetched ({type(e).__name__}: {e}); it was not found in "
        f"{where}. tiktoken downloads it on first use, which needs network access. Either run "
        f"`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once with "
        f"TIKTOKEN_CACHE_DIR=DIR on a machine with network and copy DIR here, or put the two files "
        f"into DIR under the names tiktoken looks for: {_gpt2_cache_names()}; then set "
        f"TIKTOKEN_CACHE_DIR=DIR.") from e


class _TiktokenTokenizer(Tokenizer):
  """A byte-level BPE run by tiktoken (lossless on any text); subclasses say which encoding."""

  @abc.abstractmethod
  def _encoding(self):
    """The tiktoken Encoding, loaded once per process."""

  @property
  def vocab_size(self) -> int:
    return self._encoding().n_vocab

  @property
  def eos_id(self) -> int:
    return self._encoding().eot_token

  def encode(self, text):
    # encode_ordinary: a literal "<|endoftext|>" inside a web page is text, not a document break.
    return self._encoding().encode_ordinary(text)

  def encode_batch(self, texts):
    return self._encoding().encode_ordinary_batch(list(texts), num_threads=_NUM_THREADS)

  def decode(self, ids):
    return self._encoding().decode([int(i) for i in ids])


@dataclasses.dataclass(frozen=True)
class GPT2Tokenizer(_TiktokenTokenizer):
  """GPT-2's byte-level BPE through tiktoken's "gpt2" encoding."""

  @property
  def name(self) -> str:
    return "gpt2"

  # Known without the BPE file, so specs can be checked offline.
  @property
  def vocab_size(self) -> int:
    return 50257

  @property
  def eos_id(self) -> int:
    return 50256

  def _encoding(self):
    return _gpt2_encoding()


def _byte_to_char() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for
  themselves, the other 68 bytes for chr(256), chr(257), ... in byte order."""
  keep = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  others = [b for b in range(256) if b not in keep]
  table = {b: chr(b) for b in keep}
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


class _BytePairEncoding:
  """GPT-2's byte-level BPE from a Hugging Face vocab.json and merges.txt, run as GPT-2's own
  encoder runs it (openai/gpt-2 src/encoder.py `bpe`): each pre-token's bytes, as characters,
  repeatedly merge the adjacent pair that comes first in merges.txt, every occurrence of it left to
  right, until no adjacent pair is a merge. Only listed merges apply, in merges.txt's order,
  whatever the tokens' ids. (Ranking by the ids of merged tokens, as tiktoken does, would merge any
  adjacent pair whose joined string is a token: with merges "a b", "b c", "a bc", "abc" would become
  [abc] where GPT-2 gives [ab, c].)"""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
    self.vocab = vocab
    self.ranks = {pair: n for n, pair in enumerate(merges)}
    self.byte_to_char = _byte_to_char()
    char_to_byte = {c: b for b, c in self.byte_to_char.items()}
    self.id_to_bytes = {i: bytes(char_to_byte[c] for c in token) for token, i in vocab.items()}
    self.pattern = regex.compile(GPT2_PATTERN)
    self._cache: dict[str, tuple[str, ...]] = {}

  def _merge(self, word: str) -> tuple[str, ...]:
    if word in self._cache:
      return self._cache[word]
    parts = list(word)
    while len(parts) > 1:
      best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    self._cache[word] = tuple(parts)
    return self._cache[word]

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self.pattern.findall(text):
      word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
      ids += [self.vocab[token] for token in self._merge(word)]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return b"".join(self.id_to_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4)
def _bpe_encoding(directory: str) -> _BytePairEncoding:
  """The BPE of a Hugging Face byte-level BPE's vocab.json and merges.txt, checked."""
  paths = {n: os.path.join(directory, n) for n in ("vocab.json", "merges.txt")}
  missing = [p for p in paths.values() if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"tokenizer directory {directory!r} lacks {', '.join(missing)} (a GPT-2-style "
                     "byte-level BPE: vocab.json and merges.txt, as Hugging Face writes them)")
  try:
    with open(paths["vocab.json"], encoding="utf-8") as f:
      vocab = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{paths['vocab.json']} is not a JSON object of token -> id ({e})") from e
  if not isinstance(vocab, dict) or EOS_TEXT not in vocab:
    raise ValueError(f"{paths['vocab.json']} must map tokens to ids and hold {EOS_TEXT!r}")
  alphabet = set(_byte_to_char().values())
  for token in vocab:
    if not set(token) <= alphabet:
      raise ValueError(f"{paths['vocab.json']}: token {token!r} is not in GPT-2's byte alphabet "
                       "(not a byte-level BPE vocabulary)")
  missing_bytes = [b for b, c in _byte_to_char().items() if c not in vocab]
  if missing_bytes:
    raise ValueError(f"{paths['vocab.json']} lacks single-byte tokens (e.g. byte "
                     f"{missing_bytes[0]}): not a byte-level BPE vocabulary")
  with open(paths["merges.txt"], encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")
              if line.strip() and not line.startswith("#version")]
  for n, pair in enumerate(merges, 1):
    if len(pair) != 2 or "".join(pair) not in vocab:
      raise ValueError(f"{paths['merges.txt']} line {n} ({' '.join(pair)!r}) is not a merge of two "
                       "tokens whose result vocab.json holds")
  return _BytePairEncoding(vocab, merges)


@dataclasses.dataclass(frozen=True)
class BPETokenizer(Tokenizer):
  """A GPT-2-style byte-level BPE read from a local directory (vocab.json, merges.txt), encoded by
  GPT-2's own algorithm in Python (merges in merges.txt's order; see _BytePairEncoding), so any
  such files tokenize as their tokenizer does. GPT-2's own files give GPT-2's ids; "gpt2"
  (tiktoken, compiled) is the faster for preparing large corpora."""

  directory: str

  @property
  def name(self) -> str:
    return f"bpe:{self.directory}"

  @property
  def vocab_size(self) -> int:
    return len(_bpe_encoding(self.directory).vocab)

  @property
  def eos_id(self) -> int:
    return _bpe_encoding(self.directory).vocab[EOS_TEXT]

  def encode(self, text):
    # A literal "<|endoftext|>" inside the text is text, not a document break (as tiktoken's
    # encode_ordinary reads it for "gpt2").
    return _bpe_encoding(self.directory).encode(text)

  def decode(self, ids):
    return _bpe_encoding(self.directory).decode(ids)


@functools.lru_cache(maxsize=4)
def _sentencepiece_processor(path: str):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"SentencePiece model file {path!r} does not exist")
  processor = spm.SentencePieceProcessor()
  if not processor.Load(path):
    raise ValueError(f"{path!r} is not a SentencePiece model file")
  if processor.eos_id() < 0:
    raise ValueError(f"SentencePiece model {path!r} has no EOS piece (trained with eos_id=-1); "
                     f"documents need one: retrain it with eos_id >= 0 (train_sentencepiece does)")
  return processor


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file; holds only its path."""

  path: str

  @property
  def name(self) -> str:
    return f"sentencepiece:{self.path}"

  @property
  def vocab_size(self) -> int:
    return _sentencepiece_processor(self.path).get_piece_size()

  @property
  def eos_id(self) -> int:
    return _sentencepiece_processor(self.path).eos_id()

  def encode(self, text):
    return _sentencepiece_processor(self.path).encode(text, out_type=int)

  def encode_batch(self, texts):
    return _sentencepiece_processor(self.path).encode(list(texts), out_type=int,
                                                      num_threads=_NUM_THREADS)

  def decode(self, ids):
    return _sentencepiece_processor(self.path).decode([int(i) for i in ids])


def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `spec` (see the module docstring). Loads nothing yet.

  Raises:
    ValueError: for any other spec, listing the valid forms.
  """
  if spec == "gpt2":
    return GPT2Tokenizer()
  if isinstance(spec, str) and spec.startswith("bpe:") and len(spec) > len("bpe:"):
    return BPETokenizer(paths.resolve(spec[len("bpe:"):]))
  prefix = "sentencepiece:"
  if isinstance(spec, str) and spec.startswith(prefix) and len(spec) > len(prefix):
    return SentencePieceTokenizer(paths.resolve(spec[len(prefix):]))
  raise ValueError(f"unknown tokenizer {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
  # SentencePiece trains on "sentences" and drops any longer than max_sentence_length bytes, so
  # documents go in line by line, long lines cut into pieces.
  for text in texts:
    for line in text.splitlines():
      line = line.strip()
      while line:
        piece = line[:max_bytes // 4]  # <= 4 UTF-8 bytes per character.
        line = line[len(piece):]
        yield piece


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int) -> str:
  """Trains a unigram SentencePiece model on `texts`; for a user's own corpus.

  Ids: unk 0, bos 1, eos 2 (EOS ends every document when a corpus is prepared), no pad.

  Args:
    texts: documents; they are fed to the trainer line by line.
    model_prefix: writes `model_prefix.model` and `model_prefix.vocab` (parent dirs are made).
    vocab_size: number of pieces, control pieces included (> 3).

  Returns:
    The path of the .model file, for the spec "sentencepiece:PATH".
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size <= 3:
    raise ValueError(f"vocab_size must exceed the 3 control pieces, got {vocab_size}")
  parent = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(parent, exist_ok=True)
  max_bytes = 4192
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_training_sentences(texts, max_bytes)),
      model_prefix=model_prefix, vocab_size=vocab_size, model_type="unigram",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=max_bytes,
      num_threads=_NUM_THREADS, minloglevel=2)
  path = model_prefix + ".model"
  _sentencepiece_processor.cache_clear()  # A retrained model may reuse the path.
  return path
