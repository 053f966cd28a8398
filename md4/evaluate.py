"""The bound on a dataset split (an autoregressive model's exact likelihood): bits per token (char,
dim) with its standard error, and perplexity; and the zero-shot table.

Each example's estimate averages K draws of (t, z_t) from a key of its own (fold_in(rng, index)),
so results do not depend on the batch size or the number of devices and processes. Bits per token
are total nats over total tokens, each token of the split counted once; the standard error is over
examples.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from md4 import model, sharding
from md4.state import stream_key
from md4.config import Config
from md4.data.pipeline import Dataset


class EvalResult(NamedTuple):
  nats_per_example: float
  bits_per_token: float
  bits_se: float  # Standard error of bits_per_token over examples.
  perplexity: float  # exp(nats per token); meaningful for text.
  num_examples: int
  unit: str  # "char", "token" or "dim".

  def metrics(self, prefix: str = "eval") -> dict[str, float]:
    return {f"{prefix}/bits_per_{self.unit}": self.bits_per_token,
            f"{prefix}/bits_per_{self.unit}_se": self.bits_se,
            f"{prefix}/perplexity": self.perplexity,
            f"{prefix}/num_examples": self.num_examples}

  def summary(self) -> str:
    return (f"{self.bits_per_token:.4f} ± {self.bits_se:.4f} bits/{self.unit} "
            f"(perplexity {self.perplexity:.3f}, {self.num_examples} examples)")


def _batch_sums(params, batch, rng, *, network, cfg):
  """Weighted sums over a batch (replicated scalars): nats, tokens, nats/token and its square, n."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(batch["index"])
  nats = model.OBJECTIVES[cfg.model.objective].eval(cfg, network, params, batch["x"], keys,
                                                    model.class_labels(cfg, batch))
  tokens = math.prod(batch["x"].shape[1:])
  w = batch["weight"]
  per_token = nats / tokens
  return jnp.stack([(w * nats).sum(), w.sum() * tokens, (w * per_token).sum(),
                    (w * per_token**2).sum(), w.sum()])


class Evaluator:
  """Evaluates the bound (or exact likelihood) over a split, every example exactly once; compiled
  once per instance."""

  def __init__(self, network: nn.Module, cfg: Config, mesh: Mesh):
    sharding.check_batch_size(cfg.eval.batch_size, mesh, "eval.batch_size")
    self.cfg, self.mesh = cfg, mesh
    # (params, batch, rng) -> the sums of one batch; md4/aot.py compiles it from shapes alone.
    sums = functools.partial(_batch_sums, network=network, cfg=cfg)
    self.batch_sums = jax.jit(sharding.in_mesh(sums, mesh), out_shardings=sharding.replicated(mesh))

  def __call__(self, params, dataset: Dataset, *, split: str | None = None,
               max_examples: int | None = None, rng: jax.Array | None = None) -> EvalResult:
    """split and max_examples default to cfg.eval's; rng to the seed's "eval" stream."""
    cfg = self.cfg
    split = cfg.eval.split if split is None else split
    max_examples = cfg.eval.max_examples if max_examples is None else max_examples
    rng = stream_key(cfg.train.seed, "eval") if rng is None else rng
    totals = np.zeros(5, np.float64)
    for local in dataset.eval_iterator(split, cfg.eval.batch_size, jax.process_index(),
                                       jax.process_count(), max_examples):
      batch = sharding.global_batch(local, self.mesh)
      totals += np.asarray(self.batch_sums(params, batch, rng), np.float64)
    if totals[4] == 0:
      raise ValueError(f"split {split!r} of dataset {cfg.data.dataset!r} has no examples")
    return result_from_sums(totals, dataset.spec.unit)


def result_from_sums(totals: np.ndarray, unit: str) -> EvalResult:
  """The result from float64[5] sums over examples: nats, tokens, nats/token, its square, count."""
  nats, tokens, s1, s2, n = totals
  # The mean is per token over the whole split (each token once); the standard error is that of
  # the mean of per-example nats/token, the examples being exchangeable draws of the bound.
  var = max(s2 / n - (s1 / n) ** 2, 0.0) * n / max(n - 1, 1)
  return EvalResult(
      nats_per_example=nats / n, bits_per_token=nats / tokens / math.log(2.0),
      bits_se=math.sqrt(var / n) / math.log(2.0),
      # exp overflows a float past ~709 nats per token (a diverged model): report inf.
      perplexity=math.exp(nats / tokens) if nats / tokens < 700 else math.inf,
      num_examples=int(n), unit=unit)


class ZeroShotRow(NamedTuple):
  """One corpus of the zero-shot table."""
  title: str
  num_documents: int
  num_blocks: int  # Full blocks plus the shorter last one, if any.
  num_tokens: int
  time_samples: int  # Draws of (t, z_t) per block; 0 for an exact (autoregressive) likelihood.
  result: EvalResult
  paper_md4_s: float

  @property
  def perplexity_se(self) -> float:
    """Standard error of the perplexity (delta method on the per-block bits/token)."""
    return self.result.perplexity * math.log(2.0) * self.result.bits_se


def zero_shot_row(evaluator: Evaluator, params, name: str, rows: list[str], tokenizer,
                  seq_length: int, vocab_size: int) -> ZeroShotRow:
  """The model's perplexity on one zero-shot corpus, every token of its test set scored once.

  Args:
    evaluator: an Evaluator of the model (its cfg.eval.num_time_samples draws per block).
    params: the model's parameters.
    name: the corpus (md4.data.zero_shot.CORPORA).
    rows: its test set's rows (md4.data.zero_shot.read_rows).
    tokenizer: the model's tokenizer.
    seq_length: the model's sequence length (the block length).
    vocab_size: the dataset vocabulary of the model (its tokenizer's).
  """
  from md4.data import zero_shot as zs  # pylint: disable=g-import-not-at-top
  blocks = zs.tokenize(name, rows, tokenizer, seq_length)
  result = evaluator(params, zs.ZeroShotSet(name, blocks, vocab_size, seq_length), split="test",
                     max_examples=0)
  exact = evaluator.cfg.model.objective == "autoregressive"
  return ZeroShotRow(zs.corpus(name).title, blocks.num_documents,
                     len(blocks.blocks) + bool(blocks.tail.size), blocks.num_tokens,
                     0 if exact else evaluator.cfg.eval.num_time_samples, result,
                     zs.corpus(name).paper_md4_s)


def causal_zero_shot_row(judge, name: str, rows: list[str], seq_length: int) -> ZeroShotRow:
  """A Hugging Face GPT-2's exact perplexity on one zero-shot corpus: GPT-2's row of the table.

  The test set is detokenised, tokenised (with the model's own tokenizer, GPT-2's for the paper)
  and cut into blocks of seq_length exactly as `zero_shot_row` does for a diffusion model, so the
  same tokens are scored; each block is read on its own after the model's start token (GPT-2's
  end-of-text token), every one of its tokens scored once, as the diffusion models score each block
  without the blocks before it.

  Args:
    judge: an md4.judge.GPT2Judge (its tokenizer, start token, context and forward pass).
    name: the corpus (md4.data.zero_shot.CORPORA).
    rows: its test set's rows (md4.data.zero_shot.read_rows).
    seq_length: the block length of the diffusion models the row is set beside (<= the context).
  """
  from md4.data import zero_shot as zs  # pylint: disable=g-import-not-at-top
  if seq_length > judge.context:
    raise ValueError(f"blocks of {seq_length} tokens exceed the model's context of "
                     f"{judge.context}")
  blocks = zs.tokenize(name, rows, judge.tokenizer, seq_length)
  totals = np.zeros(5, np.float64)
  parts = [blocks.blocks] + ([blocks.tail[None]] if blocks.tail.size else [])
  for x in parts:
    if not len(x):
      continue
    inputs = np.concatenate([np.full((len(x), 1), judge.bos_id, np.int32), x[:, :-1]], axis=1)
    nats = judge.position_nll(inputs, x).astype(np.float64).sum(-1)
    per_token = nats / x.shape[1]
    totals += [nats.sum(), x.size, per_token.sum(), (per_token**2).sum(), len(x)]
  return ZeroShotRow(zs.corpus(name).title, blocks.num_documents, len(parts[0]) + (len(parts) > 1),
                     blocks.num_tokens, 0, result_from_sums(totals, "token"),
                     zs.corpus(name).paper_md4_s)


ZERO_SHOT_HEADER = ("| corpus | documents | blocks | tokens | time samples / block | perplexity | "
                    "MD4-S, paper (<=) |\n|---|---|---|---|---|---|---|")


def zero_shot_line(row: ZeroShotRow) -> str:
  """The row's line of a Markdown table under ZERO_SHOT_HEADER; a bound is marked <=."""
  bound = "<= " if row.time_samples else ""
  samples = row.time_samples or "- (exact)"
  return (f"| {row.title} | {row.num_documents} | {row.num_blocks} | {row.num_tokens} | "
          f"{samples} | {bound}{row.result.perplexity:.2f} ± {row.perplexity_se:.2f} | "
          f"{row.paper_md4_s:.2f} |")
