"""Zero-shot perplexity: reading each corpus's public dumps, detokenising, counting tokens, the CLI.

Token counts are worked out by hand with the tiny tokenizer of tests/tiny_bpe.py (its docstring
lists the merges): e.g. "the cat" is t|he|Ġ|c|a|t, 6 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_bpe
from configs.md4 import openwebtext
from md4 import config as config_lib
from md4 import train
from md4.data import pipeline, tokenizers
from md4.data import zero_shot as zs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenizers.get_tokenizer(tiny_bpe.write(str(tmp_path_factory.mktemp("bpe"))))


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _parquet(path, column, rows):
  pq.write_table(pa.table({column: rows}), str(path))
  return str(path)


def _jsonl(path, field, rows):
  path.write_text("".join(json.dumps({field: r}) + "\n\n" for r in rows), encoding="utf-8")
  return str(path)


# --------------------------------------------------------------------------------- detokenising

@pytest.mark.parametrize("name,raw,clean", [
    ("wikitext2", " The game 's score was 1 @,@ 000 @-@ 2 . \n",
     " The game's score was 1,000-2.\n"),
    ("wikitext103", " = = Reception = = \n", " == Reception ==\n"),
    ("wikitext2", "a ( b c ) d [ e ] \" f \"", 'a (b c) d [e] "f"'),
    ("ptb", "the company 's stock fell N % \\/ N", "the company's stock fell 1 % / N"),
    ("ptb", "they do n't like an <unk> deal", "they don't like an ? deal"),
    ("lm1b", "I 'm here , he said .", "I'm here, he said."),
    ("lm1b", "see http : / / example.com now for $ 5", "see http://example.com now for $5"),
    ("lambada", "\N{LEFT DOUBLE QUOTATION MARK}Hi,\N{RIGHT DOUBLE QUOTATION MARK} she said.  ",
     '\n"Hi," she said.'),
])
def test_each_corpus_is_detokenized_by_its_rule(name, raw, clean):
  assert zs.corpus(name).detokenize(raw) == clean


# --------------------------------------------------------------------------------- reading dumps

def test_wikitext_rows_are_lines_with_newlines_and_blank_lines_empty(tmp_path):
  rows = [" = A = \n", "", " B @-@ C . \n"]
  txt = _write(tmp_path / "wiki.test.raw", " = A = \n \n B @-@ C . \n")
  parquet = _parquet(tmp_path / "test-00000-of-00001.parquet", "text", rows)
  assert zs.read_rows("wikitext2", [txt]) == rows
  assert zs.read_rows("wikitext103", [parquet]) == rows


def test_ptb_rows_are_stripped_lines_or_the_sentence_column(tmp_path):
  txt = _write(tmp_path / "ptb.test.txt", " a b N \n c d\n")
  parquet = _parquet(tmp_path / "ptb.parquet", "sentence", ["a b N", "c d"])
  jsonl = _jsonl(tmp_path / "ptb.jsonl", "sentence", ["a b N", "c d"])
  for path in (txt, parquet, jsonl):
    assert zs.read_rows("ptb", [path]) == ["a b N", "c d"]


def test_lm1b_and_lambada_read_every_file_in_order(tmp_path):
  shards = [_write(tmp_path / f"news.en.heldout-0000{i}-of-00050", f" s{i}a \ns{i}b\n")
            for i in range(2)]
  assert zs.read_rows("lm1b", shards) == ["s0a", "s0b", "s1a", "s1b"]
  assert zs.read_rows("lm1b", [str(tmp_path / "news.en.heldout-*")]) == ["s0a", "s0b", "s1a",
                                                                          "s1b"]
  jsonl = _jsonl(tmp_path / "lambada_test.jsonl", "text", ["p one", "p two"])
  plain = _write(tmp_path / "lambada.txt", "p one\n\n p two \n")
  parquet = _parquet(tmp_path / "lambada.parquet", "text", ["p one", "p two"])
  for path in (jsonl, plain, parquet):
    assert zs.read_rows("lambada", [path]) == ["p one", "p two"]


def test_bad_sources_are_named(tmp_path):
  with pytest.raises(ValueError, match="source file .*nowhere.jsonl' does not exist"):
    zs.read_rows("lambada", [str(tmp_path / "nowhere.jsonl")])
  bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
    zs.read_rows("lambada", [bad])
  wrong = _parquet(tmp_path / "wrong.parquet", "body", ["x"])
  with pytest.raises(ValueError, match=r"wrong.parquet: a parquet file without a 'text' column"):
    zs.read_rows("wikitext2", [wrong])
  with pytest.raises(ValueError, match="unknown zero-shot corpus 'c4'; valid: lambada, wikitext2"):
    zs.read_rows("c4", [bad])
  with pytest.raises(ValueError, match="no --source file"):
    zs.read_rows("ptb", [])


# ------------------------------------------------------------------------------------- tokens

def test_documents_end_with_eos_and_every_token_lands_in_a_block(tokenizer):
  # "the cat" -> t|he|Ġ|c|a|t + EOS (7); "tin" -> t|in + EOS (3): 10 tokens, blocks of 4.
  blocks = zs.tokenize("ptb", ["the cat", "tin"], tokenizer, seq_length=4)
  t, he, space, c, a, in_ = 83, 257, 220, 66, 64, 259
  eos = tiny_bpe.EOS
  np.testing.assert_array_equal(blocks.blocks, [[t, he, space, c], [a, t, eos, t]])
  np.testing.assert_array_equal(blocks.tail, [in_, eos])
  assert (blocks.num_tokens, blocks.num_documents) == (10, 2)


def test_wikitext_token_count_by_hand(tokenizer):
  # " = A = \n" -> " = A =\n" -> Ġ= | ĠA | Ġ= split in bytes (6) + "\n" (1) + EOS = 8;
  # "" -> EOS = 1; " the\n" -> Ġthe | \n + EOS = 3. 12 tokens: one block of 12, no tail.
  blocks = zs.tokenize("wikitext2", [" = A = \n", "", " the\n"], tokenizer, seq_length=12)
  assert blocks.blocks.shape == (1, 12) and blocks.tail.size == 0
  assert list(blocks.blocks[0]).count(tiny_bpe.EOS) == 3


def test_zero_shot_set_scores_full_blocks_then_the_tail_once(tokenizer):
  blocks = zs.tokenize("ptb", ["the cat", "tin"], tokenizer, seq_length=4)
  dataset = zs.ZeroShotSet("ptb", blocks, tiny_bpe.VOCAB_SIZE, 4)
  scored = [b["x"][b["weight"] > 0] for b in dataset.eval_iterator("test", global_batch=2)]
  assert sum(x.size for x in scored) == 10
  with pytest.raises(ValueError, match="one split, 'test'"):
    dataset.num_eval_examples("valid")


# --------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def token_model(tmp_path_factory, tokenizer):
  """A tiny MD4 over the tiny tokenizer's 261 ids, blocks of 8, trained 2 steps."""
  root = tmp_path_factory.mktemp("zero_shot_model")
  overrides = ["--config.model.vocab_size=261", "--config.data.seq_length=8",
               "--config.train.num_steps=2", "--config.eval.batch_size=2"]
  config = openwebtext.get_config("tiny")
  for item in overrides:
    key, value = item[len("--config."):].split("=")
    group, name = key.split(".")
    config[group][name] = int(value)
  cfg = config_lib.from_configdict(config)
  spec = pipeline.DatasetSpec(261, (8,), "text", "token")
  train.train(cfg, str(root / "run"), dataset=pipeline.SyntheticDataset(spec))
  return str(root / "run"), ["--config=configs/md4/openwebtext.py:tiny"] + overrides


def _eval(workdir, config_flags, *flags):
  return subprocess.run([sys.executable, "-m", "md4.main", "eval", f"--workdir={workdir}",
                         *config_flags, *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_md4_eval_zero_shot_prints_the_table_with_exact_token_counts(token_model, tokenizer,
                                                                     tmp_path):
  workdir, config_flags = token_model
  ptb = _write(tmp_path / "ptb.test.txt", " the cat \n tin \n")  # 10 tokens: 1 block + a tail.
  lambada = _jsonl(tmp_path / "lambada_test.jsonl", "text", ["the cat"])  # \n|t|he|Ġ|c|a|t|EOS.
  done = _eval(workdir, config_flags, "--zero_shot=all", f"--source=ptb={ptb},lambada={lambada}",
               f"--tokenizer={tokenizer.name}")
  assert done.returncode == 0, done.stderr[-3000:]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in done.stdout.splitlines() if line.startswith("| ")}
  # documents, blocks, tokens, time samples, perplexity, paper.
  assert rows["PTB"][:4] == ["2", "2", "10", "1"] and rows["PTB"][5] == "102.26"
  assert rows["LAMBADA"][:4] == ["1", "1", "8", "1"] and rows["LAMBADA"][5] == "48.43"
  assert rows["PTB"][4].startswith("<= ")  # A bound.
  perplexity = float(rows["PTB"][4][3:].split(" ± ")[0])
  assert 1.0 < perplexity < 10 * tiny_bpe.VOCAB_SIZE  # A bound of a barely trained model.

  single = _eval(workdir, config_flags, "--zero_shot=ptb", f"--source={ptb}",
                 f"--tokenizer={tokenizer.name}")
  assert single.returncode == 0, single.stderr[-3000:]
  assert any(line.startswith("| PTB | 2 | 2 | 10 |") for line in single.stdout.splitlines())


def test_md4_eval_zero_shot_names_bad_arguments(token_model, tokenizer, tmp_path):
  workdir, config_flags = token_model
  tok = f"--tokenizer={tokenizer.name}"
  cases = [
      (["--zero_shot=all", "--source=/x/y.txt"], "takes --source=NAME=FILE"),
      (["--zero_shot=c4", "--source=/x/y.txt"], "unknown zero-shot corpus 'c4'"),
      (["--zero_shot=ptb", f"--source={tmp_path}/missing.txt"], "missing.txt' does not exist"),
      (["--zero_shot=ptb", f"--source={_write(tmp_path / 'empty.txt', '')}"], "hold no rows"),
      (["--zero_shot=ptb", f"--source={tmp_path}/missing.txt", "--split=valid"],
       "--split does not apply"),
  ]
  for flags, message in cases:
    done = _eval(workdir, config_flags, *flags, tok)
    assert done.returncode != 0 and message in done.stderr, (flags, done.stderr[-2000:])
