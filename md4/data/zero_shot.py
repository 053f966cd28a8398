"""Zero-shot test sets: the protocol of the paper's zero-shot table, inherited from SEDD.

SEDD (Lou et al. 2024), whose evaluation MD4 (Shi et al. 2024, Table 1) and MDLM (Sahoo et al.
2024) follow, scores a model trained on OpenWebText on five test sets: LAMBADA (OpenAI's
lambada_test.jsonl), WikiText-2 and WikiText-103 (wikitext-*-raw-v1, test), the Penn Treebank
(ptb_text_only, test) and One Billion Words (lm1b, test). Each row of a test set is one document:
it is detokenised by its corpus's rule (undoing the corpora's tokenisation, as SEDD does), tokenised
with the model's tokenizer (GPT-2's for the paper), and followed by EOS; the documents are
concatenated in order and cut into blocks of the model's sequence length. Perplexity is
exp(total nats / total tokens) of the model's bound over all blocks.

One difference from SEDD, on purpose: SEDD concatenates and cuts per batch of 1000 rows (a side
effect of `datasets.map(batched=True)`) and drops each batch's remainder; here every token counts
once: the documents are cut as one stream and the last, shorter block is scored too.

Files are read as their public dumps come: parquet (the Hugging Face copies), jsonl (OpenAI's
LAMBADA), or plain text (the raw files: wiki.test.raw, ptb.test.txt, news.en.heldout-*), which are
read line by line the way the Hugging Face builders turn them into rows. Sources may be files,
directories or glob patterns.

WikiText-2 and WikiText-103 share their test articles, so with one model and key their rows agree.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from md4.data import base, documents
from md4.data.tokenizers import Tokenizer


def _wikitext(text: str) -> str:
  """WikiText's detokeniser (SEDD, MDLM): unescape @-@ @,@ @.@, reattach punctuation, brackets,
  quotes and headings."""
  text = text.replace("s '", "s'")
  text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
  for escaped, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
    text = text.replace(escaped, plain)
  for mark in ":;.!?,":
    text = text.replace(f" {mark} ", f"{mark} ")
  for opening, closing in (("(", ")"), ("[", "]"), ("{", "}")):
    o, c = re.escape(opening), re.escape(closing)
    text = re.sub(rf"{o}\s*([^{c}]*?)\s*{c}", rf"{opening}\1{closing}", text)
  text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
  text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
  for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
    text = text.replace(spaced, joined)
  text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
  text = text.replace(" \n", "\n").replace("\n ", "\n")
  text = text.replace(" N ", " 1 ")
  return text.replace(" 's", "'s")


def _ptb(text: str) -> str:
  """The Penn Treebank's detokeniser (SEDD, MDLM): contractions, slashes, N -> 1, <unk> -> ?."""
  text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
  text = text.replace(" \n ", "\n").replace("\\/", "/")
  for _ in range(10):  # Overlapping " N N " runs need repeated passes.
    text = text.replace(" N ", " 1 ")
  text = text.replace("$ 1", "$1").replace("# 1", "#1")
  return text.replace("<unk>", "?")


def _lm1b(text: str) -> str:
  """One Billion Words' detokeniser (SEDD, MDLM): URLs, punctuation, quotes, brackets, currency."""
  text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
  text = re.sub(r" '(\w+)", r"'\1", text)
  text = re.sub(r" (\w+) \. ", r" \1. ", text)
  text = re.sub(r" (\w+) \.$", r" \1.", text)
  text = text.replace(" ? ", "? ")
  text = re.sub(r" \?$", "?", text)
  text = text.replace(" ! ", "! ")
  text = re.sub(r" \!$", "!", text)
  for mark in ",:;":
    text = text.replace(f" {mark} ", f"{mark} ")
  text = text.replace(" / ", "/")
  text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
  text = re.sub(r"' ([^']+) '", r"'\1'", text)
  text = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", text)
  text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
  return text.replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")


def _lambada(text: str) -> str:
  """LAMBADA's (SEDD, MDLM): curly double quotes to straight ones, a leading newline."""
  text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
  text = text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
  return "\n" + text.strip()


def _lines_kept(path: str) -> Iterator[str]:
  """WikiText's raw files: a row per line, newline kept; blank lines are empty rows."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield line if line.strip() else ""


def _lines_stripped(path: str) -> Iterator[str]:
  """PTB's and 1BW's raw files: a row per line, stripped."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield line.strip()


def _passages(path: str) -> Iterator[str]:
  """LAMBADA as plain text: a passage per non-blank line."""
  for line in _lines_stripped(path):
    if line:
      yield line


@dataclasses.dataclass(frozen=True)
class Corpus:
  title: str  # The column title of the paper's table.
  field: str  # The text column of the parquet and jsonl dumps.
  read_lines: Callable[[str], Iterator[str]]  # Rows of a plain-text dump.
  detokenize: Callable[[str], str]
  paper_md4_s: float  # The paper's MD4-S zero-shot perplexity (Table 1 of arXiv 2406.04329v4).


CORPORA: dict[str, Corpus] = {
    "lambada": Corpus("LAMBADA", "text", _passages, _lambada, 48.43),
    "wikitext2": Corpus("WikiText2", "text", _lines_kept, _wikitext, 34.94),
    "ptb": Corpus("PTB", "sentence", _lines_stripped, _ptb, 102.26),
    "wikitext103": Corpus("WikiText103", "text", _lines_kept, _wikitext, 35.90),
    "lm1b": Corpus("1BW", "text", _lines_stripped, _lm1b, 68.10),
}


def corpus(name: str) -> Corpus:
  if name not in CORPORA:
    raise ValueError(f"unknown zero-shot corpus {name!r}; valid: {', '.join(CORPORA)}")
  return CORPORA[name]


def resolve_files(name: str, sources: Sequence[str]) -> list[str]:
  """Files, directories (every file below, sorted) and glob patterns -> the files, in order.

  Raises:
    ValueError: naming a source that matches no file.
  """
  if not sources:
    raise ValueError(f"zero-shot corpus {name}: no --source file given")
  files = []
  for source in map(os.path.expanduser, sources):
    if os.path.isfile(source):
      files.append(source)
    elif os.path.isdir(source):
      found = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                     if os.path.isfile(p))
      if not found:
        raise ValueError(f"zero-shot corpus {name}: directory {source!r} holds no file")
      files += found
    else:
      found = sorted(p for p in glob.glob(source) if os.path.isfile(p))
      if not found:
        raise ValueError(f"zero-shot corpus {name}: source file {source!r} does not exist")
      files += found
  return files


def read_rows(name: str, sources: Sequence[str]) -> list[str]:
  """The rows of corpus `name`'s test set from local files (see resolve_files), in file order.

  A file is read by its suffix: .parquet (column corpus.field, or "text" if PTB's dump has that),
  .jsonl / .jsonl.gz (the same field), anything else as plain text, row by row as the Hugging Face
  builder of the corpus splits it.

  Raises:
    ValueError: naming a missing file, a file without the expected column or field, or a test set
      without rows.
  """
  c = corpus(name)
  rows: list[str] = []
  for path in resolve_files(name, sources):
    if path.endswith(".parquet"):
      rows += documents.read_parquet_field(path, _parquet_field(path, c.field))
    elif path.endswith((".jsonl", ".jsonl.gz")):
      rows += documents.read_jsonl_field(path, c.field)
    else:
      try:
        rows += c.read_lines(path)
      except UnicodeDecodeError as e:
        raise ValueError(f"zero-shot corpus {name}: {path!r} is not UTF-8 text (expected "
                         ".parquet, .jsonl or a plain-text dump)") from e
  if not rows:
    raise ValueError(f"zero-shot corpus {name}: its source files hold no rows")
  return rows


def _parquet_field(path: str, field: str) -> str:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  names = pq.ParquetFile(path).schema_arrow.names
  return field if field in names or "text" not in names else "text"


@dataclasses.dataclass(frozen=True)
class Blocks:
  """A tokenised test set: blocks int32[N, L], the shorter last block, and the token count."""
  blocks: np.ndarray
  tail: np.ndarray  # int32[r], 0 <= r < L.
  num_documents: int

  @property
  def num_tokens(self) -> int:
    return self.blocks.size + self.tail.size


def tokenize(name: str, rows: Sequence[str], tokenizer: Tokenizer, seq_length: int) -> Blocks:
  """Detokenises each row, tokenises it followed by EOS, concatenates, cuts into blocks."""
  detokenize = corpus(name).detokenize
  ids = tokenizer.encode_batch([detokenize(r) for r in rows])
  stream = np.fromiter((i for doc in ids for i in (*doc, tokenizer.eos_id)), np.int32)
  full = len(stream) // seq_length * seq_length
  return Blocks(stream[:full].reshape(-1, seq_length), stream[full:], len(rows))


class ZeroShotSet(base.Dataset):
  """A tokenised zero-shot test set as an evaluation dataset: split "test" only; every token is
  scored once (the full blocks, then the shorter last block)."""

  def __init__(self, name: str, blocks: Blocks, vocab_size: int, seq_length: int):
    self.name = name
    self.data = blocks
    self.spec = base.DatasetSpec(vocab_size, (seq_length,), "text", "token")

  def _check(self, split: str) -> None:
    if split != "test":
      raise ValueError(f"zero-shot corpus {self.name} has one split, 'test'; got {split!r}")

  def num_eval_examples(self, split):
    self._check(split)
    return len(self.data.blocks)

  def describe_example(self, split, source_index):
    self._check(split)
    length = self.spec.example_shape[0]
    end = min((source_index + 1) * length, self.data.blocks.size + self.data.tail.size)
    return (f"zero-shot corpus {self.name} test block {source_index} (tokens "
            f"[{source_index * length}, {end}) of its tokenised rows)")

  def eval_example(self, split, index):
    self._check(split)
    return {"x": self.data.blocks[index]}

  def eval_tail(self, split):
    self._check(split)
    return {"x": self.data.tail[None]} if self.data.tail.size else None
