"""A tiny GPT-2-style byte-level BPE written as a Hugging Face tokenizer directory, for tests.

Ids 0..255 are the 256 bytes in GPT-2's order (printable Latin-1 bytes other than space first, in
byte order, then the rest), as GPT-2's own vocab.json has them; then four merges and EOS:

  256 "Ġt" (space + t)   257 "he"   258 "Ġthe"   259 "in"   260 "<|endoftext|>"

so token counts are easy to work out by hand: "the cat" is t|he|Ġ|c|a|t (6), " the" is Ġthe (1),
"tin" is t|in (2), "é" is its 2 UTF-8 bytes.
"""

from __future__ import annotations

import json
import os

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
VOCAB_SIZE = 261
EOS = 260


def byte_chars() -> list[str]:
  """The 256 byte tokens as GPT-2 writes them, in id order."""
  first = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  rest = [b for b in range(256) if b not in first]
  shifted = {b: chr(256 + n) for n, b in enumerate(rest)}
  return [chr(b) for b in first] + [shifted[b] for b in rest]


def byte_ids() -> dict[int, int]:
  """byte value -> token id."""
  first = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  rest = [b for b in range(256) if b not in first]
  return {b: i for i, b in enumerate(first + rest)}


def write(directory: str) -> str:
  """Writes vocab.json and merges.txt into directory; returns the tokenizer spec 'bpe:DIR'."""
  os.makedirs(directory, exist_ok=True)
  vocab = {c: i for i, c in enumerate(byte_chars())}
  for a, b in MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  return f"bpe:{directory}"
