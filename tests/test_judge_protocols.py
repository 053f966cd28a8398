"""The judge protocols (md4/judge_protocols.py) against NumPy transcriptions of their sources.

Each reference below is written from the peer's code as it reads, not from md4's implementation:
mdlm from kuleshov-group/mdlm diffusion.py (eval_retokenize: a Hugging Face tokenizer with
truncation and padding to the longest; compute_generative_perplexity: batches of min(8, N), chunks
of the judge's context, cross-entropy of logits[..., :-1] against ids[..., 1:], the mask
first_eos | (ids != eos) with first_eos = cumsum(ids == eos) == 1, pooled); sedd from
Score-Entropy-Discrete-Diffusion run_train.py (ids fed directly, batches of 32, mean over samples
of exp(mean cross-entropy)). The judge is the tiny random GPT-2 of tests/tiny_gpt2.py (context 12),
its forward pass in float64 NumPy.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_bpe
import tiny_gpt2
from md4 import judge, judge_protocols

EOS = tiny_bpe.EOS
CONTEXT = tiny_gpt2.CONTEXT
# "the cat" = t|he|Ġ|c|a|t (6 tokens); "tin" = t|in (2); " the" = Ġthe (1); "é" = 2 bytes.
TEXTS = [
    "the cat",  # Short: padded; the first padding EOS is mdlm's one scored EOS.
    "<|endoftext|>the cat",  # A marker first: mdlm's first EOS at position 0 is never scored.
    "the cat<|endoftext|>tin<|endoftext|>",  # Markers inside and at the end.
    "the cat " * 3 + "tin the cat",  # 23 tokens: truncated by mdlm, two windows for md4.
    "",  # No token at all.
    "é in the",
    "tin",
    "<|endoftext|>",
    "the cat tin",  # t|he|Ġ|c|a|t|Ġt|in; the ninth: mdlm drops it (one full batch of 8).
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("gpt2"))
  weights = tiny_gpt2.write_gpt2(directory, seed=3)
  return judge.GPT2Judge(directory), weights


def _hf_encode(tok, text):
  """A Hugging Face GPT-2 tokenizer's ids: the literal marker is the EOS id, the rest BPE."""
  out = []
  for n, piece in enumerate(text.split("<|endoftext|>")):
    out += ([EOS] if n else []) + tok.encode(piece)
  return out


def _np_mdlm(w, tok, texts, max_length):
  """kuleshov-group/mdlm compute_generative_perplexity, transcribed: (per-sample nll, count)."""
  ids = [_hf_encode(tok, t)[:max_length] for t in texts]  # truncation=True, max_length
  width = max(len(i) for i in ids)  # padding=True: the longest; pad_token = eos_token
  samples = np.array([i + [EOS] * (width - len(i)) for i in ids], np.int64).reshape(len(ids), width)
  batch_size = min(8, len(texts))
  nll, count = np.zeros(len(texts)), np.zeros(len(texts))
  for b in range(len(texts) // batch_size):
    for row in range(b * batch_size, (b + 1) * batch_size):
      for start in range(0, width, CONTEXT):  # torch.split(..., eval_context_size, dim=-1)
        chunk = samples[row, start:start + CONTEXT]
        if len(chunk) < 2:
          continue
        nlls = tiny_gpt2.np_token_nll(w, chunk[:-1], chunk[1:])
        first_eos = np.cumsum(chunk == EOS) == 1
        token_mask = chunk != EOS
        mask = (first_eos[1:] | token_mask[1:]).astype(float)
        nll[row] += (nlls * mask).sum()
        count[row] += mask.sum()
  return nll, count


def _np_md4(w, tok, text):
  """This project's protocol: pieces between markers, windows of CONTEXT after the start token."""
  total, count = 0.0, 0
  for piece in text.split("<|endoftext|>"):
    ids = tok.encode(piece)
    for start in range(0, len(ids), CONTEXT):
      window = ids[start:start + CONTEXT]
      total += tiny_gpt2.np_token_nll(w, [EOS] + window[:-1], window).sum()
      count += len(window)
  return total, count


def test_md4_protocol_scores_each_piece_after_the_start_token(gpt2):
  g, w = gpt2
  tok = g.tokenizer
  score = g.score(TEXTS, protocol="md4")
  expected = np.array([_np_md4(w, tok, t) for t in TEXTS])
  # Hand counts: the markers are not scored, every token of a piece is.
  np.testing.assert_array_equal(score.sample_tokens, [6, 6, 8, 23, 0, 5, 2, 0, 8])
  np.testing.assert_array_equal(score.sample_tokens, expected[:, 1])
  np.testing.assert_allclose(score.sample_nll, expected[:, 0], rtol=1e-5)
  assert score.kept.all()
  assert score.perplexity == pytest.approx(math.exp(expected[:, 0].sum() / expected[:, 1].sum()),
                                           rel=1e-5)


@pytest.mark.parametrize("max_length", [10, 20])
def test_mdlm_protocol_matches_its_source(gpt2, max_length):
  g, w = gpt2
  tok = g.tokenizer
  samples = np.zeros((len(TEXTS), max_length), np.int32)  # Only their length is read.
  score = g.score(TEXTS, samples, protocol="mdlm")
  nll, count = _np_mdlm(w, tok, TEXTS, max_length)
  # Hand counts at max_length 10 (rows padded to 10, one chunk): "the cat" 5 + the first padding
  # EOS; EOS-first rows score no EOS; the marker row 5 + EOS + 2 (the second EOS not); the long row
  # its 9 later tokens; "" and "<|endoftext|>" nothing; the ninth row is dropped.
  if max_length == 10:
    np.testing.assert_array_equal(score.sample_tokens, [6, 6, 8, 9, 0, 5, 2, 0, 0])
  else:  # Padded to 20: chunks of 12 and 8 tokens, each with its first token unscored.
    np.testing.assert_array_equal(score.sample_tokens[3], 11 + 7)
  np.testing.assert_array_equal(score.sample_tokens, count)
  np.testing.assert_allclose(score.sample_nll, nll, rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(score.kept, np.arange(len(TEXTS)) < 8)
  assert score.perplexity == pytest.approx(math.exp(nll.sum() / count.sum()), rel=1e-5)


def test_sedd_protocol_matches_its_source(gpt2):
  g, w = gpt2
  rng = np.random.default_rng(0)
  samples = rng.integers(0, tiny_bpe.VOCAB_SIZE, (33, 9)).astype(np.int32)
  samples[:, 0] = EOS  # End-of-text tokens first, inside and last: all fed and scored as they are.
  samples[3, 4] = samples[5, -1] = EOS
  texts = [g.tokenizer.decode(s) for s in samples]
  score = g.score(texts, samples, protocol="sedd")
  batches = 33 // 32
  total = 0.0
  for b in range(batches):
    s = samples[b * 32:(b + 1) * 32]
    total += np.mean([np.exp(tiny_gpt2.np_token_nll(w, r[:-1], r[1:]).mean()) for r in s])
  expected = total / batches
  assert score.perplexity == pytest.approx(expected, rel=1e-5)
  np.testing.assert_array_equal(score.kept, np.arange(33) < 32)
  np.testing.assert_array_equal(score.sample_tokens[:32], 8)
  per_sample = [tiny_gpt2.np_token_nll(w, r[:-1], r[1:]).sum() for r in samples[:32]]
  np.testing.assert_allclose(score.sample_nll[:32], per_sample, rtol=1e-5)


def test_sedd_protocol_refuses_what_its_source_cannot_score(gpt2):
  g, _ = gpt2
  samples = np.full((32, 9), 83, np.int32)
  texts = [g.tokenizer.decode(s) for s in samples]
  with pytest.raises(ValueError, match="batches of 32 samples.*got 31"):
    g.score(texts[:31], samples[:31], protocol="sedd")
  with pytest.raises(ValueError, match="exceed its context of 12"):
    long = np.full((32, 13), 83, np.int32)
    g.score([g.tokenizer.decode(s) for s in long], long, protocol="sedd")
  with pytest.raises(ValueError, match="sample 0 does not decode to the same text"):
    g.score(["x"] + texts[1:], samples, protocol="sedd")
  with pytest.raises(ValueError, match="unknown judge protocol 'gpt'; valid: md4, mdlm, sedd"):
    g.score(texts, samples, protocol="gpt")


def test_mdlm_and_sedd_need_a_gpt2_judge():
  class CharacterJudge:
    description = "a character-level judge"
  with pytest.raises(ValueError, match="defined for a GPT-2 judge.*takes --judge_protocol=md4"):
    judge_protocols.score(CharacterJudge(), "mdlm", ["abc"], np.zeros((1, 3), np.int32))


def test_md4_sample_refuses_a_protocol_before_sampling(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The tiny config draws 2 samples: sedd's batches of 32 are refused before anything is loaded.
  done = subprocess.run([sys.executable, "-m", "md4.main", "sample", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}/none", f"--judge={tmp_path}",
                         "--judge_protocol=sedd"], cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1
  assert "batches of 32 samples (SEDD's eval.perplexity_batch_size); got 2" in done.stderr, (
      done.stderr[-2000:])
