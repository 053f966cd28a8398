"""GPT-2's row of the zero-shot table: `md4 eval --zero_shot=all --model=DIR` on a tiny random GPT-2
in the Hugging Face layout, against an independent NumPy computation of its exact likelihood on the
same blocks (each block read after the end-of-text token, every token scored once)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_bpe
import tiny_gpt2
from md4 import evaluate, judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = tiny_bpe.EOS
BLOCK = 8
# Rows the corpora's detokenisers leave as they are, so the expected tokens are plain BPE.
PTB_ROWS = ["the cat", "tin", "the cat in the tin"]  # 6+1, 2+1, 6+Ġ|in+Ġthe+Ġt|in+1 = 22 tokens.
LAMBADA = "the cat"  # \n|t|he|Ġ|c|a|t then EOS: one full block of 8.


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("gpt2"))
  return directory, tiny_gpt2.write_gpt2(directory, seed=7)


def _expected(weights, tok, docs):
  """(perplexity, se of perplexity, tokens, blocks) from NumPy, float64."""
  stream = [i for d in docs for i in tok.encode(d) + [EOS]]
  blocks = [stream[i:i + BLOCK] for i in range(0, len(stream), BLOCK)]
  nats = np.array([tiny_gpt2.np_token_nll(weights, [EOS] + b[:-1], b).sum() for b in blocks])
  sizes = np.array([len(b) for b in blocks])
  per_token = nats / sizes
  perplexity = math.exp(nats.sum() / sizes.sum())
  se = math.sqrt(per_token.var(ddof=1) / len(blocks)) if len(blocks) > 1 else 0.0
  return perplexity, perplexity * se, int(sizes.sum()), len(blocks)


def test_causal_zero_shot_row_is_the_exact_likelihood_of_the_same_blocks(gpt2):
  directory, weights = gpt2
  g = judge.GPT2Judge(directory)
  row = evaluate.causal_zero_shot_row(g, "ptb", PTB_ROWS, BLOCK)
  perplexity, se, tokens, blocks = _expected(weights, g.tokenizer, PTB_ROWS)
  assert (row.num_documents, row.num_blocks, row.num_tokens, row.time_samples) == (3, 3, 22, 0)
  assert (tokens, blocks) == (22, 3)
  assert row.result.perplexity == pytest.approx(perplexity, rel=1e-5)
  assert row.perplexity_se == pytest.approx(se, rel=1e-4)
  with pytest.raises(ValueError, match="blocks of 13 tokens exceed the model's context of 12"):
    evaluate.causal_zero_shot_row(g, "ptb", PTB_ROWS, 13)


def test_md4_eval_zero_shot_model_prints_gpt2s_row(gpt2, tmp_path):
  directory, weights = gpt2
  ptb = tmp_path / "ptb.test.txt"
  ptb.write_text("".join(f" {r} \n" for r in PTB_ROWS))
  lambada = tmp_path / "lambada_test.jsonl"
  lambada.write_text(json.dumps({"text": LAMBADA}) + "\n")
  done = subprocess.run(
      [sys.executable, "-m", "md4.main", "eval", "--config=configs/tiny.py",
       f"--config.data.seq_length={BLOCK}", "--zero_shot=all", f"--model={directory}",
       f"--source=ptb={ptb},lambada={lambada}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in done.stdout.splitlines() if line.startswith("| ")}
  tok = judge.GPT2Judge(directory).tokenizer
  for title, docs in (("PTB", PTB_ROWS), ("LAMBADA", ["\n" + LAMBADA])):
    perplexity, se, tokens, blocks = _expected(weights, tok, docs)
    assert rows[title][:4] == [str(len(docs)), str(blocks), str(tokens), "- (exact)"]
    assert rows[title][4] == f"{perplexity:.2f} ± {se:.2f}", (rows[title], perplexity, se)
  refused = subprocess.run(
      [sys.executable, "-m", "md4.main", "eval", "--config=configs/tiny.py",
       f"--model={directory}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1 and "--model goes with --zero_shot" in refused.stderr
