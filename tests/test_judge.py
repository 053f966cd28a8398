"""Judges of sample quality: GPT-2 in JAX from a Hugging Face directory, this project's own
autoregressive models, unigram entropy, and the sweep of samplers against steps.

A tiny random GPT-2 is written in the Hugging Face layout (config.json, model.safetensors, and the
tokenizer of tests/tiny_bpe.py); its forward pass is checked against GPT-2's written out in NumPy
here, and its scores against NLLs computed from that NumPy model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_bpe
import tiny_gpt2
from configs import judge_demo, tiny
from md4 import autoregressive, judge, model, train
from md4 import config as config_lib
from md4.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, HEADS, WIDTH, CONTEXT = (tiny_gpt2.LAYERS, tiny_gpt2.HEADS, tiny_gpt2.WIDTH,
                                 tiny_gpt2.CONTEXT)
_write_gpt2 = tiny_gpt2.write_gpt2
_np_gpt2_logits = tiny_gpt2.np_gpt2_logits


def _np_nll(w, ids):
  """NLL of ids read after <|endoftext|>, in windows of CONTEXT tokens."""
  total = 0.0
  for start in range(0, len(ids), CONTEXT):
    window = list(ids[start:start + CONTEXT])
    logits = _np_gpt2_logits(w, [tiny_bpe.EOS] + window[:-1])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total -= sum(logp[j, tok] for j, tok in enumerate(window))
  return total


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("gpt2"))
  return directory, _write_gpt2(directory, prefix="transformer.")


def test_gpt2_forward_pass_matches_numpy(gpt2_dir):
  directory, weights = gpt2_dir
  gpt2 = judge.GPT2Judge(directory)
  ids = np.array([[260, 83, 257, 220, 66, 64, 83, 259, 258, 0, 127, 102]])
  ours = np.asarray(judge.gpt2_logits(gpt2.params, jnp.asarray(ids), gpt2.config))
  expected = _np_gpt2_logits(weights, ids[0])
  np.testing.assert_allclose(ours[0], expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_gpt2_judge_scores_retokenised_text_after_endoftext(gpt2_dir):
  directory, weights = gpt2_dir
  gpt2 = judge.GPT2Judge(directory)
  # "the cat" = t|he|Ġ|c|a|t; "" has no token; "é in the" = 2 bytes of é, Ġ|in, Ġthe; the long
  # text is 2 + 3 x (4 + 1) - 1 + 2 + 1 + 4 = 23 tokens (" tin" = Ġt|in), 2 windows of the 12-token
  # context.
  texts = ["the cat", "", "é in the", "the cat " * 3 + "tin the cat", "tin<|endoftext|>the cat"]
  ids = [gpt2.tokenize(t) for t in texts]
  assert ids[0] == [83, 257, 220, 66, 64, 83] and ids[1] == [] and len(ids[2]) == 5
  assert len(ids[3]) == 23
  # A decoded end-of-text token cuts a sample: "tin" and "the cat" are scored as texts of their own,
  # each after the start token; the marker itself is not scored.
  assert ids[4] == [83, 259] + ids[0]
  pieces = ids[:4] + [[83, 259], ids[0]]
  score = gpt2.score(texts)
  assert score.num_tokens == sum(len(i) for i in pieces)
  expected = sum(_np_nll(weights, i) for i in pieces)
  np.testing.assert_allclose(score.nll, expected, rtol=1e-5)
  assert score.perplexity == pytest.approx(math.exp(expected / score.num_tokens), rel=1e-5)


@pytest.mark.parametrize("damage,message", [
    (dict(drop="h.1.mlp.c_fc.bias"), "lacks tensor 'h.1.mlp.c_fc.bias'"),
    (dict(bad_shape="wpe.weight"), r"'wpe.weight' has shape \(3,\), config.json implies \(12, 16\)"),
])
def test_a_damaged_gpt2_directory_is_named(tmp_path, damage, message):
  _write_gpt2(str(tmp_path / "gpt2"), **damage)
  with pytest.raises(ValueError, match=message):
    judge.load_judge(str(tmp_path / "gpt2"))


def test_a_gpt2_with_other_options_or_an_untied_head_is_refused(tmp_path):
  directory = str(tmp_path / "g")
  _write_gpt2(directory)
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(config, n_inner=3 * WIDTH), f)
  with pytest.raises(ValueError, match="n_inner=48; this judge runs GPT-2's own architecture"):
    judge.load_judge(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  tensors = dict(load_file(os.path.join(directory, "model.safetensors")))
  tensors["lm_head.weight"] = tensors["wte.weight"] + 1.0
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
    judge.load_judge(directory)


def test_a_judge_directory_must_be_gpt2_or_a_workdir(tmp_path):
  with pytest.raises(ValueError, match="expected a Hugging Face GPT-2 directory.*or the workdir"):
    judge.load_judge(str(tmp_path))
  _write_gpt2(str(tmp_path / "g"))
  os.remove(tmp_path / "g" / "merges.txt")
  with pytest.raises(ValueError, match="lacks .*merges.txt"):
    judge.load_judge(str(tmp_path / "g"))


def test_unigram_entropy_is_the_entropy_of_each_samples_own_tokens():
  assert judge.unigram_entropy(np.zeros((3, 10), np.int32)) == 0.0
  uniform = np.tile(np.arange(8), (2, 2))  # Each sample holds 8 tokens twice each: log 8.
  np.testing.assert_allclose(judge.unigram_entropy(uniform), math.log(8), rtol=1e-12)
  mixed = np.array([[0, 0, 0, 1], [5, 6, 7, 8]])  # H(3/4, 1/4) and log 4, averaged.
  expected = (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(4)) / 2
  np.testing.assert_allclose(judge.unigram_entropy(mixed), expected, rtol=1e-12)


# ------------------------------------------------------------- autoregressive models of ours

def test_autoregressive_nll_is_next_token_cross_entropy_after_bos():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
  x = jnp.array([[1, 2, 3, 4], [0, 0, 1, 1]])
  seen = []

  def logits_fn(inputs):
    seen.append(np.asarray(inputs))
    return logits

  nll = np.asarray(autoregressive.nll(logits_fn, x, bos=5))
  np.testing.assert_array_equal(seen[0], [[5, 1, 2, 3], [5, 0, 0, 1]])
  logp = np.asarray(jax.nn.log_softmax(logits))
  expected = [-sum(logp[b, i, x[b, i]] for i in range(4)) for b in range(2)]
  np.testing.assert_allclose(nll, expected, rtol=1e-6)


def test_a_causal_transformer_sees_no_later_token():
  cfg = config_lib.from_configdict(judge_demo.get_config("tiny"))
  spec = pipeline.get_spec(cfg.data)
  network = model.build_network(cfg, spec)
  params = model.init_params(jax.random.key(0), network, cfg.model, spec)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape),
                        params)  # Non-zero output layer.
  z = jax.random.randint(jax.random.key(2), (2, 16), 0, 27)
  t = jnp.zeros((2,))
  base = network.apply({"params": params["net"]}, z, t)
  later = network.apply({"params": params["net"]}, z.at[:, 9].set((z[:, 9] + 1) % 27), t)
  np.testing.assert_array_equal(np.asarray(base[:, :9]), np.asarray(later[:, :9]))
  assert float(jnp.max(jnp.abs(base[:, 9:] - later[:, 9:]))) > 1e-4


@pytest.mark.parametrize("changes,message", [
    ({"model.objective": "autoregressive"}, "needs .*model.net.causal=True"),
    ({"model.net": dict(causal=True)}, "a causal network cannot denoise"),
    ({"model.objective": "next_token"},
     "model.objective='next_token' is invalid; valid: 'diffusion'"),
])
def test_objective_combinations_are_checked(changes, message):
  config = tiny.get_config()
  for key, value in changes.items():
    group, name = key.split(".")
    config[group][name] = dict(config[group][name], **value) if isinstance(value, dict) else value
  with pytest.raises(ValueError, match=message):
    config_lib.from_configdict(config)


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("judge") / "run")
  result = train.train(config_lib.from_configdict(judge_demo.get_config("tiny")), workdir)
  return workdir, result


def test_model_judge_scores_text8_characters_with_its_exact_likelihood(judge_run):
  workdir, result = judge_run
  judged = judge.ModelJudge(workdir)
  assert judged.held_out_bits == pytest.approx(result.eval.bits_per_token, rel=1e-6)
  assert "autoregressive judge" in judged.description and "bits/char" in judged.description
  texts = ["to be or not", "the king is dead long live the king"]  # 12 and 35 chars; context 16.
  score = judged.score(texts)
  assert score.num_tokens == 12 + 35
  cfg = config_lib.from_configdict(judge_demo.get_config("tiny"))
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  net = result.state.ema_params["net"]
  from md4.data import text8
  total = 0.0
  for text in texts:
    ids = text8.encode(text)
    for start in range(0, len(ids), 16):
      x = jnp.asarray(ids[start:start + 16])[None]
      logits_fn = lambda inputs: setup.network.apply({"params": net}, inputs, jnp.zeros((1,)))
      total += float(autoregressive.nll(logits_fn, x, bos=27)[0])
  np.testing.assert_allclose(score.nll, total, rtol=1e-5)


def test_md4_sample_sweep_prints_the_table_and_writes_the_plot(judge_run, tmp_path):
  judge_dir, _ = judge_run
  workdir = str(tmp_path / "diffusion")
  train.train(config_lib.from_configdict(tiny.get_config()), workdir)
  done = subprocess.run([sys.executable, "-m", "md4.main", "sample", f"--workdir={workdir}",
                         "--config=configs/tiny.py", f"--judge={judge_dir}",
                         "--sweep_steps=2,4", "--sweep_grids=uniform,cosine",
                         "--sweep_methods=ancestral,maskgit_greedy,first_hitting",
                         f"--output={tmp_path}/sweep"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
  body = [[c.strip() for c in r] for r in rows[1:] if not r[0].strip().startswith("---")]
  grid_samplers = ("ancestral", "maskgit_greedy")
  assert [tuple(r[:3]) for r in body] == [
      (m, g, n) for m in grid_samplers for g in ("uniform", "cosine") for n in ("2", "4")
  ] + [("first_hitting", "-", "-")]
  assert body[1][3] == "4" and body[-1][3] == "16"  # Network calls: 4 steps; 16 tokens.
  assert body[4][7] == "temperature=0.0" and body[0][7] == "-"  # The samplers' settings.
  for r in body:
    assert 1.0 < float(r[5]) and 0.0 <= float(r[6]) <= math.log(16)
  assert os.path.getsize(tmp_path / "sweep.png") > 1000
  assert "generative perplexity = exp(total NLL / total judge tokens)" in (
      tmp_path / "sweep.md").read_text()
