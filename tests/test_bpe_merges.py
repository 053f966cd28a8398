"""`bpe:DIR` applies merges.txt in its order, as GPT-2's own encoder does (openai/gpt-2
src/encoder.py `bpe`: merge the adjacent pair of lowest merge rank, all its occurrences, until no
adjacent pair is a listed merge), never a pair merely because its joined string is a token."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tiny_bpe
from md4.data import tokenizers


def _write(directory, merges, *, ids_reversed=False):
  """vocab.json (the 256 bytes, then the merges' results, then EOS) and merges.txt; with
  ids_reversed the merged tokens' ids run against the merge order."""
  os.makedirs(directory, exist_ok=True)
  vocab = {c: i for i, c in enumerate(tiny_bpe.byte_chars())}
  results = list(dict.fromkeys(a + b for a, b in merges))
  ids = range(256, 256 + len(results))
  for token, i in zip(results, reversed(ids) if ids_reversed else ids):
    vocab[token] = i
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tokenizers._bpe_encoding.cache_clear()  # pylint: disable=protected-access
  return tokenizers.get_tokenizer(f"bpe:{directory}"), vocab


def _gpt2_bpe(token, merges):
  """openai/gpt-2 encoder.py's bpe(), transcribed: the merged pieces of one pre-token."""
  ranks = {pair: i for i, pair in enumerate(merges)}
  word = tuple(token)
  pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
  while pairs:
    bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
    if bigram not in ranks:
      break
    first, second = bigram
    new_word, i = [], 0
    while i < len(word):
      try:
        j = word.index(first, i)
      except ValueError:
        new_word.extend(word[i:])
        break
      new_word.extend(word[i:j])
      i = j
      if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
        new_word.append(first + second)
        i += 2
      else:
        new_word.append(word[i])
        i += 1
    word = tuple(new_word)
    if len(word) == 1:
      break
    pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
  return list(word)


def test_the_issues_example_follows_merges_not_the_vocabulary(tmp_path):
  merges = [("a", "b"), ("b", "c"), ("a", "bc")]
  tok, vocab = _write(str(tmp_path / "t"), merges)
  # "abc": (a, b) ranks first -> [ab, c]; (ab, c) is no merge, though "abc" is a token.
  assert tok.encode("abc") == [vocab["ab"], vocab["c"]]
  assert _gpt2_bpe("abc", merges) == ["ab", "c"]
  assert tok.encode("bc") == [vocab["bc"]]
  assert tok.encode("xbc") == [vocab["x"], vocab["bc"]]
  assert tok.decode(tok.encode("abc abc")) == "abc abc"


@pytest.mark.parametrize("ids_reversed", [False, True])
def test_random_words_match_gpt2s_algorithm(tmp_path, ids_reversed):
  merges = [("a", "b"), ("b", "c"), ("a", "bc"), ("c", "c"), ("ab", "c"), ("cc", "c"),
            ("b", "a"), ("ab", "ab"), ("Ġ", "a"), ("Ġa", "b"), ("c", "a"), ("ba", "c")]
  tok, vocab = _write(str(tmp_path / "t"), merges, ids_reversed=ids_reversed)
  rng = np.random.default_rng(0)
  for _ in range(300):
    text = "".join(rng.choice(list("abc "), size=rng.integers(1, 12)))
    expected = []
    for piece in tokenizers.regex.findall(tokenizers.GPT2_PATTERN, text):
      expected += [vocab[t] for t in _gpt2_bpe(piece.replace(" ", "Ġ"), merges)]
    assert tok.encode(text) == expected, text
    assert tok.decode(tok.encode(text)) == text


def test_the_tiny_tokenizer_of_the_tests_is_unchanged(tmp_path):
  tok = tokenizers.get_tokenizer(tiny_bpe.write(str(tmp_path / "tiny")))
  ids = tiny_bpe.byte_ids()
  assert tok.encode("the cat") == [ids[ord("t")], 257, 220, ids[ord("c")], ids[ord("a")],
                                   ids[ord("t")]]
  assert tok.encode(" the tin<|endoftext|>") == [258, 256, 259] + tok.encode("<|endoftext|>")
  assert tok.eos_id == 260 and tok.vocab_size == 261
